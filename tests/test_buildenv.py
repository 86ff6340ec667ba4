"""What a build's steps see (``ci.buildenv``): a virtualenv of their own for
each attempt, so that installing a project (or another PyYAML, rich or
pytest) can never change the environment tinyci runs from; the default
steps of an installable project (a src/ layout that only works installed);
and CI_JOB. Real attempts in a real clone, through ``Execution``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ci.attempt import RunRequest
from ci.buildenv import PTH, build_env, make_venv, own_bin
from ci.execution import DEFAULT_INSTALL_STEP, DEFAULT_TEST_STEP
from ci.models import Status

from conftest import Repo
from test_execution import Slot

# A PEP 517 backend inside the project: pip builds its wheel with nothing to download
# (no setuptools or wheel needed), so these tests run offline.
BACKEND = '''
import base64, hashlib, os, zipfile

NAME, VERSION = open("NAME").read().split()

def _files():
    for top, _, names in os.walk("src"):
        for name in names:
            path = os.path.join(top, name)
            yield path, os.path.relpath(path, "src")

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    dist = f"{NAME}-{VERSION}.dist-info"
    wheel = f"{NAME}-{VERSION}-py3-none-any.whl"
    entries = [(arc, open(path, "rb").read()) for path, arc in _files()]
    entries += [(f"{dist}/METADATA", f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n".encode()),
                (f"{dist}/WHEEL", b"Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")]
    record = "".join(f"{arc},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\\n" for arc, data in entries) + f"{dist}/RECORD,,\\n"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as z:
        for arc, data in entries + [(f"{dist}/RECORD", record.encode())]:
            z.writestr(arc, data)
    return wheel
'''
PYPROJECT = ('[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n')
OFFLINE = {"PIP_NO_INDEX": "1"}


def project(repo: Repo, name: str, files: dict[str, str]) -> str:
    return repo.commit(f"the {name} project", {"pyproject.toml": PYPROJECT, "backend.py": BACKEND,
                                               "NAME": f"{name} 0.0.1\n", **files})


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_installing_into_a_build_never_touches_tinycis_environment(tmp_path):
    repo = Repo(tmp_path / "repo")
    # a project that *is* another PyYAML: installed anywhere tinyci can see, the runner breaks
    project(repo, "PyYAML", {"src/yaml/__init__.py": "FAKE = 'the build installed me'\n"})
    slot = Slot(tmp_path)
    outcome, text = slot(repo, ["python -m pip install --quiet --disable-pip-version-check .",
                                "python -c 'import yaml, sys; print(yaml.FAKE, sys.prefix)'",
                                "python -m pytest --version"], env=OFFLINE)
    assert outcome.status == Status.PASSED, text
    venv = slot.clone.with_name(slot.clone.name + ".venv")
    assert f"the build installed me {venv}" in text                 # it went into the build's own venv
    assert "pytest " in text                                         # the runner's packages are still seen
    # ... and tinyci's own PyYAML is the real one, here and in a fresh interpreter
    assert hasattr(yaml, "safe_load")
    fresh = subprocess.run([sys.executable, "-c", "import yaml; print(yaml.__version__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert fresh.returncode == 0 and fresh.stdout.strip() == yaml.__version__
    # the next attempt starts from a fresh venv: nothing the last build installed is left
    outcome, text = slot(repo, ["python -c 'import yaml; print(hasattr(yaml, \"FAKE\"))'"], env=OFFLINE)
    assert outcome.status == Status.PASSED and "\nFalse\n" in text, text


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_an_installable_src_layout_project_gets_installed_before_its_tests(tmp_path):
    repo = Repo(tmp_path / "repo")
    project(repo, "clicky", {"src/clicky/__init__.py": "def shout(s):\n    return s.upper()\n",
                             "tests/test_shout.py": "from clicky import shout\n\n\ndef test_shout():\n"
                                                    "    assert shout('a') == 'A'\n"})
    outcome, text = Slot(tmp_path)(repo, [], env=OFFLINE)
    assert outcome.status == Status.PASSED, text
    assert "2 step(s) from the default for an installable repository with tests" in text
    assert f"$ {DEFAULT_INSTALL_STEP}\n" in text and f"$ {DEFAULT_TEST_STEP}\n" in text
    assert "1 passed" in text


def test_steps_see_their_job_and_not_the_runners_virtualenv(tmp_path):
    request = RunRequest(3, 1, "repo", "b" * 40, "main", job="lint")
    venv = make_venv(tmp_path / "co.venv")
    base = {"PATH": os.pathsep.join([*([own_bin()] if own_bin() else []), "/usr/bin", "/bin"]),
            "VIRTUAL_ENV": sys.prefix, "PYTHONHOME": "/elsewhere"}
    env = build_env(request, base, venv)
    assert env["PATH"].split(os.pathsep) == [str(venv / "bin"), "/usr/bin", "/bin"]
    assert env["VIRTUAL_ENV"] == str(venv) and "PYTHONHOME" not in env and env["CI_JOB"] == "lint"
    python = Path(env["PATH"].split(os.pathsep)[0]) / "python"
    where = subprocess.run([str(python), "-c", "import sys, pytest; print(sys.prefix)"], capture_output=True,
                           text=True, env=env)
    assert where.returncode == 0 and where.stdout.strip() == str(venv), where.stderr


def test_an_untouched_virtualenv_is_reused_and_a_touched_one_made_anew(tmp_path):
    venv = make_venv(tmp_path / "co.venv")
    made = venv.stat().st_ino
    subprocess.run([str(venv / "bin" / "python"), "-c", "import sys"], check=True)    # using it changes nothing
    assert make_venv(venv).stat().st_ino == made
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "left.pth").write_text("/somewhere\n")          # what an install leaves
    assert not (make_venv(venv) / site.relative_to(venv) / "left.pth").exists()
    pth = site / PTH
    text = pth.read_text()
    pth.write_text(text[::-1])                              # rewritten in place, the same size
    assert make_venv(venv) == venv and pth.read_text() == text
    (venv / "bin" / "activate").unlink()                    # something removed
    assert (make_venv(venv) / "bin" / "activate").exists()
