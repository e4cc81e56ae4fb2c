"""Training text from the target itself: no corpus, no download (`treespec distill` without --text).

Two phases, both batched through the engine (n-gram speculation: same outputs, faster):
1. user texts: the target samples (T = 1) a continuation of a generic seed prefix, of varied length;
2. answers: each user text, mostly wrapped in the chat template, is continued greedily (what greedy serving
   sees) or sampled (T = 1, top-p 0.95: what sampled serving sees); raw continuations cover plain completion.
A sequence is the prompt's tokens plus the answer's. Deterministic given the seed (sampling is seeded per request).
"""
from __future__ import annotations

from dataclasses import dataclass

from treespec.sampling import SamplingParams

# generic starts written for treespec (prose, instructions, questions, code, lists, letters, dialogue, data)
SEEDS = [
    "The", "In this article, we", "Question:", "Write a short story about", "Explain how", "Translate the following",
    "Summarize the text below:", "Solve the problem step by step:", "def ", "import numpy as np\n", "Dear",
    "Here is a list of", "Once upon a time", "Q: What is", "The main reason", "According to the report,",
    "Step 1:", "User review:", "Abstract:", "Recipe:", "Chapter 1", "I think that", "How can I", "Why do",
    "The following table shows", "Breaking news:", "Instructions:", "Let x be", "Compare and contrast",
    "Write an email to", "Describe the", "What are the benefits of", "Context: ", "Translate to German:",
    "The city of", "Title:", "- ", "1. ", "Hello! Can you", "Given the passage,",
]
USER_LENGTHS = (48, 96, 192)


@dataclass(frozen=True)
class GenerationPlan:
    num_samples: int
    max_tokens: int = 128
    seed: int = 0


def self_generated_sequences(llm, plan: GenerationPlan, progress: bool = True) -> list[list[int]]:
    """`plan.num_samples` token sequences (prompt + answer) written by the target loaded in `llm`."""
    n, max_len = plan.num_samples, llm.engine.max_len
    starts = [llm.encode_prompt(SEEDS[i % len(SEEDS)])[: max_len - 1] for i in range(n)]
    user_params = [SamplingParams(temperature=1.0, top_p=0.95, seed=plan.seed * 1_000_003 + i,
                                  max_tokens=min(USER_LENGTHS[i % len(USER_LENGTHS)], max_len - len(starts[i])))
                   for i in range(n)]
    users = _generate(llm, starts, user_params, "user texts", progress)
    prompts, params = [], []
    for i, text in enumerate(users):
        style = i % 4  # 0, 1: chat greedy; 2: chat sampled; 3: raw sampled
        text = text.strip() or SEEDS[i % len(SEEDS)]
        prompts.append(llm.encode_prompt(text, chat=style != 3)[: max_len - 1])
        sampled = style >= 2
        params.append(SamplingParams(temperature=1.0 if sampled else 0.0, top_p=0.95 if sampled else 1.0,
                                     seed=plan.seed * 1_000_003 + n + i,
                                     max_tokens=min(plan.max_tokens, max_len - len(prompts[-1]))))
    answers = _generate(llm, prompts, params, "answers", progress, texts=False)
    return [p + a for p, a in zip(prompts, answers)]


def _generate(llm, prompts: list[list[int]], params: list[SamplingParams], what: str, progress: bool,
              texts: bool = True) -> list:
    """Run every prompt with its own params through the engine at once; texts or token ids, in order."""
    from tqdm import tqdm
    engine = llm.make_engine({"method": "ngram"})
    window = 2 * engine.config.max_num_seqs  # requests in flight (the waiting queue is bounded)
    reqs: list = []
    with tqdm(total=len(prompts), desc=f"distill: generating {what}", disable=not progress, unit="seq") as bar:
        done = 0
        while len(reqs) < len(prompts) or engine.has_unfinished():
            while len(reqs) < len(prompts) and len(reqs) - done < window:
                sp = params[len(reqs)]  # sampled rows need full-vocabulary logits: speculation pays only greedily
                reqs.append(engine.add_request(prompts[len(reqs)], sp, speculate=sp.greedy))
            engine.step()
            now = sum(r.finished for r in reqs)
            bar.update(now - done)
            done = now
    return [r.text if texts else list(r.output_ids) for r in reqs]
