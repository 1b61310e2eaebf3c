"""Thinking models write their reasoning between <think> and </think> before the answer;
this splits a (streamed) output into thinking and content, for both dialects."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Feeds output text and returns (thinking, content) pieces. ``inside`` says the
    prompt already opened a <think> block (some templates do)."""

    def __init__(self, inside: bool = False) -> None:
        self.state = "think" if inside else "start"
        self.pending = ""
        self.strip_next = False

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        thinking, content = "", ""
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(OPEN):
                    self.pending = head[len(OPEN) :]
                    self.state = "think"
                    continue
                if head and not OPEN.startswith(head):
                    self.state = "content"
                    continue
                return thinking, content  # still ambiguous: hold
            if self.state == "think":
                at = self.pending.find(CLOSE)
                if at >= 0:
                    thinking += self.pending[:at]
                    self.pending = self.pending[at + len(CLOSE) :]
                    self.state, self.strip_next = "content", True
                    continue
                hold = next(
                    (
                        n
                        for n in range(min(len(CLOSE) - 1, len(self.pending)), 0, -1)
                        if self.pending.endswith(CLOSE[:n])
                    ),
                    0,
                )
                thinking += self.pending[: len(self.pending) - hold]
                self.pending = self.pending[len(self.pending) - hold :]
                return thinking, content
            if self.strip_next:
                self.pending = self.pending.lstrip()
                if not self.pending:
                    return thinking, content
                self.strip_next = False
            content += self.pending
            self.pending = ""
            return thinking, content

    def finish(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        if self.state == "think":
            return rest, ""
        return "", rest.lstrip() if self.strip_next else rest


def split_thinking(text: str, inside: bool = False) -> tuple[str, str]:
    splitter = ThinkSplitter(inside)
    thinking, content = splitter.feed(text)
    more_thinking, more_content = splitter.finish()
    return (thinking + more_thinking).strip(), content + more_content
