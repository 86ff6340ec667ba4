"""The rules for names that cross a boundary, written once: commit SHAs,
runner, label and job names, environment variable names and git branch names.

The protocol's field kinds, the configuration's checks, ``.ci.yaml`` and the
paths built on disk all use these, so a name one of them accepts the others
accept too.
"""

from __future__ import annotations

import re

SHA = re.compile(r"[0-9a-f]{40}\Z")
# runner names, labels, job names
NAME = re.compile(r"[\w.:@-]{1,100}\Z")
NAME_RULE = "name of 1-100 letters, digits or ._:@-"
# a job as a build shows it: its name, and a matrix combination's values: "test (python=3.11, os=linux)"
MATRIX_VALUE = re.compile(r"[\w.:@+-]{1,50}\Z")
JOB = re.compile(r"[\w.:@-]{1,100}( \([A-Za-z_][A-Za-z0-9_]*=[\w.:@+-]+(, [A-Za-z_][A-Za-z0-9_]*=[\w.:@+-]+)*\))?\Z")
JOB_MAX = 1000
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
# git check-ref-format, condensed: no control chars, space, ~^:?*[\ , no "..",
# "@{", "//", no leading "-" or "/", no trailing "/", "." or ".lock".
BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|/\.|[/.]\Z|\.lock\Z|^@\Z")


def is_sha(value: object) -> bool:
    return isinstance(value, str) and SHA.match(value) is not None


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.match(value) is not None


def is_matrix_value(value: object) -> bool:
    return isinstance(value, str) and MATRIX_VALUE.match(value) is not None


def is_job(value: object) -> bool:
    """A build's job: a .ci.yaml job name, with its matrix combination if it has one."""
    return isinstance(value, str) and len(value) <= JOB_MAX and JOB.match(value) is not None


def is_env_name(value: object) -> bool:
    return isinstance(value, str) and ENV_NAME.match(value) is not None


def is_branch(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 255 and not BAD_REF.search(value)
