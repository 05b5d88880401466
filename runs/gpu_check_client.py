"""runs/gpu_check.sh serve step: wait for `picochat serve`, then ask it a question with the openai client."""

from __future__ import annotations

import sys
import time

import openai


def main(base_url: str) -> int:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    deadline = time.monotonic() + 90
    while True:
        try:
            model = client.models.list().data[0].id
            break
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 2+3?"}], max_tokens=16
    )
    print(f"model {model} answered {reply.choices[0].message.content!r} in {time.monotonic() - started:.2f}s")
    return 0 if reply.choices and reply.choices[0].message.content is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
