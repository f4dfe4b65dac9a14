"""An SGLang frontend program run by the real ``sglang`` package (in its own venv, see
``test_server_real.py``) against a Plait server: ``python sglang_program.py URL`` prints JSON."""

import json
import sys

import sglang as sgl


@sgl.function
def qa(s, question):
    s += "Q: " + question + "\nA:"
    s += sgl.gen("answer", max_tokens=8, temperature=0, stop="\n")


@sgl.function
def pick(s):
    s += "The color of a clear daytime sky is"
    s += sgl.select("color", choices=[" blue", " green", " banana"])


@sgl.function
def two_fruits(s):
    s += "Name a fruit.\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Fruit {i + 1}:"
        f += sgl.gen("fruit", max_tokens=4, temperature=0, stop="\n")
    forks.join()
    s += "Both: " + forks[0]["fruit"] + "," + forks[1]["fruit"]


def main(url: str, with_select: bool = True) -> None:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    out = {"answer": qa.run(question="What is the capital of France?")["answer"]}
    if with_select:
        out["color"] = pick.run()["color"]
    out["fork_text"] = two_fruits.run().text()
    states = qa.run_batch(
        [{"question": "What is the capital of France?"}, {"question": "What is 2+2?"}]
    )
    out["batch"] = [s["answer"] for s in states]
    streamed = qa.run(question="What is the capital of France?", stream=True)
    out["stream"] = "".join(streamed.text_iter("answer"))
    print(json.dumps(out))


if __name__ == "__main__":
    # --no-select: sglang's select sends a batch of texts to /generate, which sglang-router
    # 0.3.2 refuses before any worker sees it (see test_data_parallel_real.py).
    main(sys.argv[1], with_select="--no-select" not in sys.argv[2:])
