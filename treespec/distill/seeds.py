"""Seed prefixes for self-distillation: the target writes its own "user texts" from these, then answers them.

Why generic and varied: the drafter should see the kinds of text the target is asked for (prose, questions,
instructions, code, lists, letters, dialogue), never one benchmark's prompts. Each seed is only an opening; the
target's sampled continuation makes every user text different.
"""
SEED_PREFIXES: tuple[str, ...] = (
    # instructions
    "Translate the following sentence into French:",
    "Translate this short paragraph into Spanish, keeping the tone informal:",
    "Summarize the main idea of the following article in two sentences:",
    "Explain to a ten-year-old why",
    "Explain the difference between",
    "Give me three tips for",
    "Rewrite this paragraph so that it sounds more polite:",
    "Write a short story about a",
    "Write a haiku about",
    "Describe, step by step, how to",
    "Suggest a name for",
    "Correct the grammar in this sentence:",
    # questions
    "What is the best way to",
    "Why do people",
    "How does a",
    "Can you tell me whether",
    "What would happen if",
    "Which is healthier,",
    "Who was the first person to",
    # reasoning and math
    "Solve for x: 3x + 7 =",
    "A train leaves the station at 9 am travelling at",
    "If a shop sells apples at 40 cents each, how much do",
    "Prove that the sum of two even numbers",
    "Let me think about this problem carefully. First,",
    # code
    "def parse_config(path):\n",
    "Write a Python function that",
    "# Read a CSV file and print the average of each column\nimport csv\n",
    "SELECT name, COUNT(*) FROM",
    "Fix the bug in this JavaScript code:\nfunction add(a, b) {",
    "class Stack:\n    \"\"\"",
    # lists and structured text
    "Shopping list for the weekend:\n1.",
    "Pros and cons of working from home:\n-",
    "Meeting notes, Tuesday:\n*",
    "Recipe: vegetable soup\nIngredients:\n",
    "| Country | Capital | Population |\n|---|---|---|\n",
    # letters and messages
    "Dear Ms. Thompson,\n\nI am writing to",
    "Hi team,\n\nJust a quick update on",
    "To whom it may concern,\n\n",
    "Subject: Request for",
    # dialogue
    "Customer: Hello, I ordered a",
    "Alice: Did you see the news this morning?\nBob:",
    "Interviewer: Tell me about a time when",
    "Q: Where can I\nA:",
    # prose
    "The village at the edge of the forest",
    "In 1854, a doctor in London",
    "It was the last day of summer, and",
    "Scientists have recently discovered that",
    "The history of the bicycle",
    "Once upon a time,",
    "Climate change affects farmers in several ways.",
    "My favourite place in the world is",
)
