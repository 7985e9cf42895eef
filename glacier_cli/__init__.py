"""Command-line conveniences shared by ``glacier-train`` and ``glacier-submit``.

Standard library only, and nothing of this repository, so both CLIs can import it
without ``glacier_submit`` reaching into ``training``'s CLI. Not rendered into bundles.
"""
