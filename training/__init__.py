"""Training side: data, models, losses, samplers, loops, CV. Light modules (bands, metrics,
folds, stats, data.competition) import without torch or smp."""
