"""General prompts the kit ships (written by us, Chinese and English). The base model's own
answers to PROMPTS are mixed into training (replay) so fine-tuning keeps its general
behaviour; HELD_OUT_PROMPTS are never trained on and measure retention per checkpoint."""

PROMPTS = [
    "今天天气怎么样？", "推荐一本好看的书。", "怎样才能睡得更好？", "给我讲个笑话吧。",
    "如何学习一门新的语言？", "早餐吃什么比较健康？", "周末可以做些什么？", "怎么做番茄炒蛋？",
    "What is the capital of France?", "Give me a tip for staying focused.",
    "How do I boil an egg?", "Suggest a name for a cat.", "What is a good way to learn to code?",
    "Tell me something interesting about the ocean.", "How can I save money each month?",
    "Write a short greeting for a birthday card.",
]
HELD_OUT_PROMPTS = [
    "怎样保持好心情？", "喝咖啡有什么好处？", "如何整理房间？",
    "How do plants make food?", "What should I pack for a picnic?", "Why is the sky blue?",
]
