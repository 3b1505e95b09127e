import platform
import subprocess
import sys

import pytest

from tests.conftest import REPOSITORY

# In a process of its own, whose allocator starts fresh: a 16 MB block is mapped on its own and freed, which raises
# glibc's mapping threshold to 16 MB; an 8 MB block then comes from the heap and stays resident once freed, unless
# return_freed_memory fixed the threshold at 1 MB. Prints the resident MB that freeing the 8 MB block gave back.
FREE_AFTER_A_LARGER_BLOCK = """
import os, sys, torch
from scripts.resources import return_freed_memory
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if sys.argv[1] == "return":
    assert return_freed_memory()
larger = torch.ones(16 * 2**18)
del larger
block = torch.ones(8 * 2**18)
held = resident_mb()
del block
print(held - resident_mb())
"""


def given_back_mb(setting: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", FREE_AFTER_A_LARGER_BLOCK, setting],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_blocks_go_back_to_the_system_at_once():
    assert given_back_mb("keep") < 1
    assert given_back_mb("return") == pytest.approx(8, abs=0.5)
