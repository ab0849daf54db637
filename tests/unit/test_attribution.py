from __future__ import annotations

import pytest

from lightloop.proxy.attribution import Attribution, resolve, split_path
from lightloop.proxy.errors import BadRequest


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/rollout/r-1/v1/chat/completions", ("r-1", None, "/v1/chat/completions")),
        ("/rollout/r-1/attempt/2/v1/chat/completions", ("r-1", 2, "/v1/chat/completions")),
        ("/rollout/abc:1@x/v1", ("abc:1@x", None, "/v1")),
        ("/v1/chat/completions", (None, None, "/v1/chat/completions")),
        ("/rollout/r-1/v2/x", (None, None, "/rollout/r-1/v2/x")),
    ],
)
def test_split_path(path: str, expected: tuple[object, ...]) -> None:
    assert split_path(path) == expected


@pytest.mark.parametrize(
    "path",
    ["/rollout/%20bad/v1/chat/completions", "/rollout/-x/v1/models", "/rollout/r/attempt/two/v1/models"],
)
def test_bad_path_ids_are_refused(path: str) -> None:
    with pytest.raises(BadRequest):
        split_path(path)


def test_the_path_wins_and_headers_add_the_rest() -> None:
    headers = {"X-Lightloop-Group": "g1", "X-Lightloop-Agent": "planner", "x-lightloop-task": "t9"}
    attribution, rest = resolve("/rollout/r1/attempt/0/v1/chat/completions", headers)
    assert attribution == Attribution("r1", "path", 0, "g1", "planner", "t9")
    assert rest == "/v1/chat/completions"


def test_headers_alone_and_nothing_at_all() -> None:
    assert resolve("/v1/chat/completions", {"X-Lightloop-Rollout": "r2"})[0] == Attribution("r2", "header")
    assert resolve("/v1/chat/completions", {})[0] == Attribution(None, "session")


def test_disagreeing_or_malformed_headers_are_refused() -> None:
    with pytest.raises(BadRequest, match="says"):
        resolve("/rollout/r1/v1/chat/completions", {"X-Lightloop-Rollout": "r2"})
    with pytest.raises(BadRequest, match="group id"):
        resolve("/v1/chat/completions", {"X-Lightloop-Group": "bad group"})
    with pytest.raises(BadRequest, match="Agent"):
        resolve("/v1/chat/completions", {"X-Lightloop-Agent": "x" * 201})


def test_mode_marks_evaluation_rollouts_and_refuses_anything_else() -> None:
    assert resolve("/v1/chat/completions", {"X-Lightloop-Mode": "val"})[0].mode == "val"
    assert resolve("/rollout/r1/v1/chat/completions", {})[0].mode == "train"
    with pytest.raises(BadRequest, match="train or val"):
        resolve("/v1/chat/completions", {"X-Lightloop-Mode": "test"})
