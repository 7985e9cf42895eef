"""The (fold, seed) job queue of fold-parallel runs: dealt evenly, no job twice, a dead worker's claim names what it did not finish."""
import threading


def test_two_workers_share_ten_jobs_five_and_five(tmp_path):
    """Five folds x two seeds on two equally fast workers: 5 + 5 (folds dealt by worker gave 6 + 4)."""
    from training.runs.jobqueue import JobQueue

    jobs = [(f, s) for f in range(5) for s in range(2)]
    q = JobQueue(str(tmp_path / "q"))
    q.fill(jobs)
    got = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(w):
        for job in q.jobs(w):
            got[w].append(job)
            q.done(w, job)
            barrier.wait()  # equal job times

    threads = [threading.Thread(target=worker, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(got[0] + got[1]) == sorted(jobs) and len(got[0]) == len(got[1]) == 5
    assert q.claimed() == [] and q.unclaimed() == []


def test_a_dead_workers_claim_names_its_unfinished_job(tmp_path):
    from training.runs.jobqueue import JobQueue

    q = JobQueue(str(tmp_path / "q"))
    q.fill([(0, 0), (1, 0), (2, 0)])
    assert q.claim(0) == (0, 0) and q.claim(1) == (1, 0)
    q.done(0, (0, 0))
    assert q.claimed() == [(1, (1, 0))] and q.unclaimed() == [(2, 0)]
    assert q.claim(0) == (2, 0) and q.claim(0) is None
