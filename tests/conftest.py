"""Shared test fixtures: tiny random models (BERT and a grouped-query-attention Llama). Helper functions
that are not fixtures live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import ray  # noqa: F401  (see below)
import torch

from helpers import tiny_bert_config, tiny_llama_config

# `import ray` binds Ray's log handler to the sys.stderr of that moment and keeps writing to it. Imported here,
# that is pytest's session-wide capture; first imported inside a test using capfd/capsys, it would be that
# test's capture file, closed after it, and every later Ray warning would print "--- Logging error ---" with a
# traceback into the next test's output (seen in CI: a one-line-error assertion failed on it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two Ray processes the tests never use, each a Python start that costs a core about a second (issue 22: the suite
# is CPU-bound on 2 cores). Ray pre-starts idle workers for the first driver of every local Ray (an actor that needs
# a worker starts one anyway), and Ray Train starts a preemption watcher actor with every worker group (it polls the
# cloud's preemption notices; a local cluster gets none). The two-worker ZeRO-3 resume test: 131.5 -> 117.9
# process-seconds. Set here, they reach every Ray the tests start, in this process or in a CLI subprocess.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Test files that bring up the local two-node cluster (`melora-tune cluster up`) on the same loopback addresses:
# two at once would collide (a second `up` times out), so they share one test process.
LOCAL_CLUSTER_FILES = {"test_cluster_local.py", "test_cluster_drills.py", "test_bad_inputs.py"}
# The longest groups (CI, 2 cores, 2026-12-06: seconds of their slow tests), sent first: pytest-xdist hands out
# groups in collection order, and a long group taken last would leave the other process idle at the end.
LONGEST_FIRST = ["two-workers", "test_trial_run.py", "local-cluster", "test_kill_drill.py", "test_search_integration.py",
                 "test_trial_tune.py", "test_instruct_search.py", "test_confirm.py", "test_report.py"]
# Files with module-scoped fixtures whose tests are still scheduled one by one: their fixtures are cheap (a tiny model,
# a Ray start) and their tests are independent multi-minute ones (each its own subprocesses), which as one group would
# keep a process busy for ~10 minutes while the other idles at the end.
PER_TEST_FILES = {"test_trial_run.py", "test_trial_tune.py"}
# Tests that fill both cores on their own: two Ray Train workers, one of them a victim run beside its unkilled
# reference (two Ray instances, four workers). They run one after another in one process while the other process
# takes lighter groups: two of them at once on 2 cores took 2-3 times as long each (full run at 0a88371, idle
# machine: the checkpoint resume 315 s beside the ZeRO-3 resume, 105 s beside a light test; MiniLM ZeRO-2 231 s,
# 72 s in a run of two tests). Listed by name: the scheduler sees node ids, not markers.
TWO_WORKER_TESTS = {
    "test_trial_run.py::test_melora_minilm_zero2_two_workers_learns_rotten_tomatoes",
    "test_trial_run.py::test_instruction_trial_zero3_on_two_workers_resumes_at_the_same_step",
    "test_trial_tune.py::test_a_failing_trial_is_restarted_by_train_then_given_up_not_repeated_by_tune",
}
TESTS = os.path.dirname(os.path.abspath(__file__))


def _file_group(nodeid: str) -> str:
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    if name + "::" + nodeid.split("::", 1)[-1] in TWO_WORKER_TESTS:
        return "two-workers"
    return "local-cluster" if name in LOCAL_CLUSTER_FILES else name


_shared: dict[str, bool] = {}


def _shares_fixtures(name: str) -> bool:
    """Whether a test file has a module-scoped fixture (often a whole search, built once per process that runs the
    file) or tests that build on each other's results through one (test_kill_drill.py compares its kills)."""
    if name not in _shared:
        try:
            with open(os.path.join(TESTS, name)) as f:
                _shared[name] = 'scope="module"' in f.read()
        except OSError:
            _shared[name] = True
    return _shared[name]


def _group(nodeid: str) -> str:
    """The scheduling unit: the two-worker tests together, the local-cluster files together, a file whose tests share
    module fixtures whole, any other test alone (the finer the units, the better the two processes are balanced at the end)."""
    group = _file_group(nodeid)
    if group in ("two-workers", "local-cluster") or (group not in PER_TEST_FILES and _shares_fixtures(group)):
        return group
    return nodeid


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist sends whole groups (``_group``) to a test process. Its own ``--dist loadgroup`` does not group
    under pytest 9 (measured: four tests marked with one group ran on both processes), hence this scheduler."""
    from xdist.scheduler import LoadScopeScheduling  # pytest-xdist: loaded only when tests run in several processes

    # Keep the collection order (longest groups first). xdist's default reorders the groups by their number of
    # tests, most first: the one-test groups (test_trial_run.py's multi-minute tests) then went last, and the full
    # run ended with one process on them while the other idled (seen: CI's last tests were those, 1810 s in all).
    config.option.loadscopereorder = False

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return Groups(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest groups first; within a group the collection order is kept (some modules rely on it)."""
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_file_group(item.nodeid), len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """MELORA_TEST_TIMELINE=FILE appends "start end process test" per test (setup to teardown): how the two
    processes were kept busy, read when the full run's time moves."""
    path = os.environ.get("MELORA_TEST_TIMELINE")
    if not path:
        yield
        return
    import time  # only when the timeline is asked for

    t0 = time.time()
    yield
    with open(path, "a") as f:
        f.write(f"{t0:.1f} {time.time():.1f} {os.environ.get('PYTEST_XDIST_WORKER', 'main')} {item.nodeid}\n")


@pytest.fixture
def tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def saved_tiny_bert(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path / "tiny-bert"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(path)
    return path


@pytest.fixture
def saved_tiny_llama(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The bundled all-MiniLM-L6-v2 tokenizer (WordPiece, [CLS]/[SEP])."""
    import transformers

    from melora_tune.adapters.models import resolve_model

    return transformers.AutoTokenizer.from_pretrained(resolve_model("minilm"))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A tiny byte-level BPE tokenizer with BOS/EOS and no pad token, like Llama/GPT ones."""
    from helpers import bpe_tokenizer

    return bpe_tokenizer()
