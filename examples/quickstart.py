"""The smallest useful Plait program: load the default model on the CPU and generate."""
import plait


def main() -> None:
    engine = plait.Engine()  # SmolLM2-135M-Instruct, device="cpu"
    messages = [{"role": "user", "content": "Give me three tips for learning a new language."}]
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
    print(f"prompt: {messages[0]['content']}\n")
    for chunk in engine.generate(prompt, {"max_new_tokens": 96, "temperature": 0}, stream=True):
        pass
    print(chunk["text"])
    meta = chunk["meta_info"]
    print(f"\n[{meta['completion_tokens']} tokens in {meta['e2e_latency']:.2f}s, "
          f"finish: {meta['finish_reason']}]")
    engine.shutdown()


if __name__ == "__main__":
    main()
