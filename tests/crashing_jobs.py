"""Pool jobs that kill their process for one study, as a codec crash or the OOM killer would,
or that take their time, as a large view on a busy host does.

The worker's pool processes are spawned: they import these by name, and read which study to
die on from the environment they inherit. Never in the test's own process (a job the worker
takes back and runs there would kill the test run).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from triage.scoring import outputs, preprocess

#: The StudyInstanceUID whose views kill the decode process that decodes them.
DIE_DECODING = "TEST_DIE_DECODING_STUDY"
#: The StudyInstanceUID whose outputs kill the process that builds them.
DIE_BUILDING = "TEST_DIE_BUILDING_STUDY"
#: Seconds each view takes to decode, except the views of the study named in QUICK_STUDY.
SLOW_DECODING_S = "TEST_SLOW_DECODING_S"
QUICK_STUDY = "TEST_QUICK_STUDY"


def _in_pool_process() -> bool:
    return multiprocessing.parent_process() is not None


def decode_view(path: str, *args: Any) -> preprocess.DecodedView:
    """:func:`~triage.scoring.preprocess.decode_view`, dying on the marked study's files, and
    slow on every file but the quick study's."""
    marked = os.environ.get(DIE_DECODING)
    if marked and marked in path and _in_pool_process():
        os._exit(139)
    slow = float(os.environ.get(SLOW_DECODING_S) or 0)
    quick = os.environ.get(QUICK_STUDY)
    if slow and not (quick and quick in path) and _in_pool_process():
        time.sleep(slow)
    return preprocess.decode_view(path, *args)


def encode_outputs(request: outputs.OutputRequest) -> list[outputs.EncodedOutput]:
    """:func:`~triage.scoring.outputs.encode_outputs`, dying on the marked study."""
    if os.environ.get(DIE_BUILDING) == request.result.study_uid and _in_pool_process():
        os._exit(137)
    return outputs.encode_outputs(request)
