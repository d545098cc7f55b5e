"""llama/common/checks.py: one check per kind of value (a number in a range, a seed, a device, the
API's prompts and dialogs), each one ArgumentError naming the argument, the value and the fix, raised
before any work (issue 38: before, these generated from nothing or ended in a traceback)."""

import pytest

from llama.common.checks import check_number, check_sizes
from llama.common.errors import ArgumentError
from tests.test_bad_inputs import NO_GPU, small_checkpoint


@pytest.mark.parametrize("value,kwargs,words", [
    (float("nan"), dict(low=0), ["x=nan", "finite"]),
    (float("inf"), dict(), ["x=inf", "finite"]),
    (2.5, dict(integer=True), ["x=2.5", "whole number"]),
    (True, dict(integer=True), ["x=True", "whole number"]),
    ("128", dict(low=1, integer=True), ["x='128'", "positive whole number"]),  # a str shows its quotes
    (0, dict(low=1, integer=True), ["x=0", "positive"]),
    (1.5, dict(low=0, high=1, high_open=True), ["x=1.5", "in [0, 1)"]),
    (0.0, dict(low=0, low_open=True), ["x=0.0", "positive"]),
])
def test_check_number_names_the_value_and_the_rule(value, kwargs, words):
    with pytest.raises(ArgumentError) as e:
        check_number("x", value, fix="e.g. 3", **kwargs)
    for word in words + ["e.g. 3"]:
        assert word in str(e.value), str(e.value)


def test_check_number_accepts_what_it_promises():
    check_number("x", 1, low=1, integer=True)
    check_number("x", 0.0, low=0, high=1, high_open=True)
    check_number("--x", 1e300)
    check_sizes(1, 1)
    with pytest.raises(ArgumentError, match=r"^--x 'a':"):  # a flag is named as typed
        check_number("--x", "a")


@pytest.fixture(scope="module")
def llama(corpus, tmp_path_factory):
    from llama.generation import Llama

    ckpt = small_checkpoint(tmp_path_factory.mktemp("checks") / "ckpt", corpus[1])
    return Llama.build(ckpt, max_seq_len=64, max_batch_size=2, device="cpu")


API = [  # before: silent (generated from nothing) or a traceback
    ("text-completion-empty-prompt", lambda m: m.text_completion([""]), ["prompts[0]", "''"]),
    ("chat-completion-empty-dialog", lambda m: m.chat_completion([[]]), ["dialogs[0]", "[]"]),
    ("generate-temperature-inf", lambda m: m.generate([[1, 2]], 2, temperature=float("inf")), ["temperature=inf"]),
]


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_refuses_nothing_to_work_on(case, llama):
    _, call, words = case
    with pytest.raises(ArgumentError) as e:
        call(llama)
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs,words", [(dict(seed=-1), ["seed=-1"]), (dict(seed=2**70), ["seed=", "whole number"]),
                                          (dict(device="foo"), ["device=foo"]), (dict(device=NO_GPU), [f"device={NO_GPU}"])])
def test_build_checks_seed_and_device_before_reading(kwargs, words, tmp_path):
    from llama.generation import Llama

    with pytest.raises(ArgumentError) as e:
        Llama.build(tmp_path / "nothing-here", **kwargs)  # the argument fails first: the path is never read
    for word in words:
        assert word in str(e.value)
