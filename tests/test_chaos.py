"""Chaos: while commits stream in over several branches, SIGKILL a random
daemon at a random moment and start it again, over and over. At the end every
commit has exactly one build, every build passed, and nothing is left running.

Seeded: the seed is printed, and TINYCI_CHAOS_SEED=<seed> replays a failure.
"""

import os
import random
import threading
import time
from collections import Counter

import pytest

from conftest import Repo, finished, free_port

pytestmark = pytest.mark.slow
BRANCHES = ["main", "feature", "fix"]
COMMITS = 33
KILLS = 12


def test_chaos_kills_lose_nothing_and_run_nothing_twice(cluster, tmp_path):
    seed = int(os.environ.get("TINYCI_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed: {seed} (replay with TINYCI_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    repo = Repo(tmp_path / "repo")
    repo.commit("initial", {"build.sh": "sleep 0.3\necho ok\n"})
    for branch in BRANCHES[1:]:
        repo.git("branch", branch)

    c = cluster(max_attempts=5)
    port = free_port()
    disp = c.dispatcher(port=port)
    runners = [c.runner(f"r{i}") for i in (1, 2, 3)]
    obs = c.observer(repo)
    c.wait_builds(lambda b: len(b) == 1 and finished(b), "the initial commit")
    # the observer has seen every branch once: from here on each commit is owed a build
    state = next((tmp_path / "observer").glob("*.json"))
    c.wait("the observer to record every branch", lambda: all(f'"{b}"' in state.read_text() for b in BRANCHES))

    made: list[str] = [repo.head()]
    done = threading.Event()

    def commit_stream() -> None:
        try:
            for i in range(COMMITS):
                branch = rng_commits.choice(BRANCHES)
                repo.git("checkout", "-q", branch)
                made.append(repo.commit(f"{branch} change {i}", {f"{branch}.txt": f"{i}\n"}))
                time.sleep(rng_commits.uniform(0.05, 0.6))
        finally:
            done.set()

    rng_commits = random.Random(seed + 1)
    writer = threading.Thread(target=commit_stream, daemon=True)
    writer.start()

    kinds = ["dispatcher", "observer", "runner"] * 2
    kinds += [rng.choice(["dispatcher", "observer", "runner", "runner"]) for _ in range(KILLS - len(kinds))]
    rng.shuffle(kinds)
    kills = Counter()
    # the sleeps here and in the commit stream are the chaos schedule (random
    # moments, random downtimes), not waits for something to happen
    for kind in kinds:
        time.sleep(rng.uniform(0.3, 2.0))
        victim = {"dispatcher": disp, "observer": obs}.get(kind) or rng.choice(runners)
        victim.kill()
        kills[kind] += 1
        time.sleep(rng.uniform(0, 0.5))
        victim.start()          # same flags: the dispatcher comes back on the same port
    writer.join(120)
    assert done.is_set(), "the commit stream did not finish"

    def all_built():
        builds = c.builds()
        shas = {b["sha"] for b in builds}
        return builds if set(made) <= shas and finished(builds) else None

    builds = c.wait("every commit to be built", all_built, timeout=120)
    attempts = Counter(b["attempt"] for b in builds)
    print(f"chaos totals: {len(made)} commits, {len(builds)} builds, kills {dict(kills)}, "
          f"attempts per build {dict(sorted(attempts.items()))}")

    per_sha = Counter(b["sha"] for b in builds)
    assert [s for s, n in per_sha.items() if n != 1] == [], "a commit was built more than once"
    assert set(per_sha) == set(made), "a build for a commit that was never made"
    ids = [b["id"] for b in builds]
    assert len(ids) == len(set(ids))
    bad = [b for b in builds if b["status"] != "passed"]
    for b in bad:       # only acceptable: it really ran out of attempts
        assert b["status"] == "error" and b["attempt"] >= 5, f"build {b['id']} ended {b['status']}: {c.log(b['id'])}"

    for d in c.daemons:
        assert d.alive(), f"{d.kind} died on its own:\n{d.log()}"
    # after all that, each still stops cleanly when asked (steps left by killed runners:
    # test_runner's restarted-runner test)
    assert [(d.kind, d.stop()) for d in c.daemons] == [(d.kind, 0) for d in c.daemons]
