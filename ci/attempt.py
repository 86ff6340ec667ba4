"""What one build attempt on a runner is asked to do and what it reports:
the ``RunRequest`` (a ``run`` message, decoded), the ``Outcome``, and
``Stopped``, raised wherever the attempt waits when it is ended from outside
(cancel, a stale lease, shutdown).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import Status


@dataclass(frozen=True)
class RunRequest:
    """What one ``run`` asks for (not a ``.ci.yaml`` job: ``job`` names one of those)."""

    build: int
    attempt: int
    repo: str
    sha: str
    branch: str
    steps: tuple = ()
    timeout: float = 600.0
    env: dict = field(default_factory=dict)
    job: str = ""                       # the .ci.yaml job to run
    artifacts_limit: int = 100 << 20    # bytes of artifacts the dispatcher takes
    inputs: tuple = ()                  # artifacts of the builds it needs: ({build, job, path}, ...)
    definition: str = ""                # the dispatcher's definition (.ci.yaml text); "" none
    override: bool = False              # the definition wins over the checkout's .ci.yaml
    secrets: dict = field(default_factory=dict, repr=False)     # build secrets: name -> value


@dataclass(frozen=True)
class Outcome:
    status: Status
    exit_code: int          # the failing step's exit code; 0 passed; -1 error/timeout/cancel
    steps: int              # steps started
    duration: float
    step_results: tuple = ()    # each step that ended: {name, run, exit_code, duration} (protocol.STEP_RESULTS)
    tests: dict | None = None   # the JUnit reports read (reports.read; protocol.TESTS); None: none


class Stopped(Exception):
    """The attempt was stopped from outside while it waited. With an argument:
    the step that was running has already logged how it ended."""
