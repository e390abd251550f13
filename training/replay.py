"""General prompts the kit ships (written for this project, English and Chinese: everyday
requests, how-tos, facts, small writing tasks, science and nature). The base model's own greedy
answers to them are mixed into training (replay), so fine-tuning keeps its general behaviour: the
model keeps seeing what it already says, next to the few identity records that teach it who it
is. Held-out prompts that measure what it kept live in training/quality.py."""
import random
import re

from training.base_answers import cached

EVERYDAY = [
    # English: everyday requests, how-tos, facts, small writing tasks
    "What is the capital of Japan?", "What is the capital of Italy?", "What is the capital of Canada?",
    "What is the capital of Egypt?", "What is the largest ocean on Earth?", "How many days are in a week?",
    "How many months are in a year?", "What is the opposite of big?", "What is the opposite of fast?",
    "What is the opposite of happy?", "What colour are bananas?", "What colour is snow?",
    "What is 4 plus 4?", "What is 10 minus 3?", "What is 6 times 7?", "What is 9 plus 10?",
    "How many legs does a spider have?", "Which planet is known as the Red Planet?",
    "What gas do plants take in from the air?", "What is the freezing point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What language is spoken in Brazil?", "How many continents are there?",
    "What do bees make?", "What is the tallest animal?", "What is the main ingredient of guacamole?",
    "How do I boil an egg?", "How do I make a cup of tea?", "How can I fall asleep faster?",
    "Give me a tip for staying focused.", "Suggest a name for a cat.", "Suggest a name for a goldfish.",
    "What is a good way to learn to code?", "Tell me something interesting about the ocean.",
    "How can I save money each month?", "Write a short greeting for a birthday card.",
    "Write a thank-you note to a teacher.", "Give me three ideas for a rainy day.",
    "How do I clean a cast iron pan?", "What should I eat before a run?", "How do I remove a coffee stain?",
    "What are some easy houseplants?", "How often should I water a cactus?", "How do I tie a tie?",
    "Explain what a noun is.", "Explain photosynthesis in one sentence.", "What is gravity?",
    "Why do leaves change colour in autumn?", "Why do we need sleep?", "What is a healthy breakfast?",
    "How can I make my mornings less stressful?", "Give me a simple recipe for pancakes.",
    "How do I make a paper airplane?", "What is the difference between weather and climate?",
    "What is a haiku? Write one about spring.", "Tell me a fun fact about cats.",
    "Tell me a fun fact about space.", "Write a two-line poem about the sea.", "Tell me a short joke.",
    "What are the primary colours?", "How do I start running as a beginner?",
    "How can I be more productive when working from home?", "What should I pack for a beach trip?",
    "How do I write a good email subject line?", "What is a good gift for a ten-year-old?",
    "How do I keep bread fresh longer?", "How long should I cook pasta?",
    "What are the benefits of drinking water?", "How can I reduce screen time?",
    "Give me a tip for public speaking.", "How do I politely decline an invitation?",
    "Write a one-sentence summary of the story of Cinderella.", "What is the Pythagorean theorem?",
    "What is the boiling point of water in Fahrenheit?", "How many minutes are in an hour?",
    "How many hours are in a day?", "What is the plural of mouse?", "What is the past tense of go?",
    "Translate 'thank you' into French.", "Translate 'good morning' into Spanish.",
    "What is a synonym for happy?", "What is a synonym for small?", "Name three fruits that are red.",
    "Name three animals that live in the sea.", "What is the fastest land animal?",
    "Why is exercise good for you?", "How do vaccines work, briefly?", "What is recycling?",
    "How can I make new friends in a new city?", "What is a good name for a book club?",
    "Suggest a weekend activity for a family.", "How do I care for a new puppy?",
    "Describe a sunset in one sentence.", "How do I make my password stronger?",
    "What is the internet, in simple words?", "Explain what a computer virus is.",
    "How do I convert kilometres to miles?", "What is 15 percent of 200?", "What is half of 50?",
    "Is a tomato a fruit or a vegetable?", "What is the longest river in Africa?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "What do you call a baby cat?", "What do you call a baby dog?", "What is the capital of Spain?",
    "What is the capital of Australia?", "What is the chemical symbol for gold?",
    "What is H2O?", "How many sides does a triangle have?", "How many sides does a hexagon have?",
    "Give me a motivational quote.", "How do I apologise to a friend?", "What is mindfulness?",
    "How do I stop procrastinating?", "Recommend a hobby I can start at home.",
    "What should I do if I feel bored?", "Summarise the rules of chess in two sentences.",
    # Chinese: 日常问题、常识、写作小任务
    "今天天气怎么样？", "推荐一本好看的书。", "怎样才能睡得更好？", "给我讲个笑话吧。",
    "如何学习一门新的语言？", "早餐吃什么比较健康？", "周末可以做些什么？", "怎么做番茄炒蛋？",
    "日本的首都是哪里？", "意大利的首都是哪里？", "一周有几天？", "一年有几个月？",
    "大的反义词是什么？", "快的反义词是什么？", "香蕉是什么颜色的？", "雪是什么颜色的？",
    "四加四等于几？", "十减三等于几？", "六乘以七等于多少？", "蜘蛛有几条腿？",
    "哪颗行星被称为红色星球？", "水在多少摄氏度结冰？", "蜜蜂会酿什么？", "世界上最高的动物是什么？",
    "怎么泡一杯好喝的茶？", "如何快速入睡？", "给我一个保持专注的小建议。", "给小猫起个名字吧。",
    "怎样开始学习编程？", "告诉我一个关于海洋的有趣知识。", "每个月怎样存钱？", "写一句生日祝福语。",
    "给老师写一句感谢的话。", "下雨天可以做哪三件事？", "跑步前应该吃什么？", "衣服上的咖啡渍怎么去掉？",
    "有哪些容易养的室内植物？", "仙人掌多久浇一次水？", "用一句话解释光合作用。", "什么是地心引力？",
    "秋天树叶为什么会变色？", "人为什么需要睡觉？", "怎样让早晨不那么匆忙？", "怎么做简单的煎饼？",
    "天气和气候有什么区别？", "写一首关于春天的短诗。", "告诉我一个关于猫的趣事。", "告诉我一个关于太空的趣事。",
    "三原色是哪三种颜色？", "初学者怎样开始跑步？", "在家办公怎样提高效率？", "去海边玩要带些什么？",
    "怎样写好一封邮件的标题？", "给十岁的孩子送什么礼物好？", "面包怎样保存更久？", "意大利面要煮多久？",
    "多喝水有什么好处？", "怎样减少看手机的时间？", "给我一个当众讲话的建议。", "怎样礼貌地拒绝别人的邀请？",
    "用一句话概括灰姑娘的故事。", "什么是勾股定理？", "一小时有多少分钟？", "一天有多少小时？",
    "把“谢谢”翻译成英文。", "“开心”的近义词是什么？", "说出三种红色的水果。", "说出三种生活在海里的动物。",
    "陆地上跑得最快的动物是什么？", "运动对身体有什么好处？", "什么是垃圾分类？", "到了新城市怎样交朋友？",
    "给读书会起个名字。", "推荐一个适合全家的周末活动。", "怎样照顾刚到家的小狗？", "用一句话描写日落。",
    "怎样设置一个更安全的密码？", "用简单的话解释什么是互联网。", "两百的百分之十五是多少？", "五十的一半是多少？",
    "西红柿是水果还是蔬菜？", "小猫的英文是什么？", "西班牙的首都是哪里？", "黄金的化学符号是什么？",
    "三角形有几条边？", "六边形有几条边？", "给我一句励志的话。", "怎样向朋友道歉？",
    "什么是正念？", "怎样克服拖延？", "推荐一个可以在家开始的爱好。", "觉得无聊的时候可以做什么？",
    "中国的首都是哪里？", "长城有多长？", "春节有哪些习俗？", "中秋节吃什么？",
    "怎样做一碗好吃的面条？", "饺子怎么包？", "如何缓解工作压力？", "怎样养成阅读的习惯？",
    "学习英语有什么好方法？", "怎样照顾一盆绿萝？", "感冒了应该注意什么？", "怎样保护眼睛？",
]

# Science and nature: without them the default run lost 4 points of SciQ (docs/eval.md); with
# twice as many in the draw it lost everyday facts instead.
SCIENCE = [
    # English
    "What organ pumps blood around the body?", "What do red blood cells carry?",
    "What is the centre of an atom called?", "What particles move around the nucleus of an atom?",
    "What force keeps the planets moving around the Sun?", "What is the closest star to Earth?",
    "How long does it take Earth to go around the Sun?", "What causes the seasons on Earth?",
    "What is it called when water turns into vapour?", "What is condensation?",
    "What are the three states of matter?", "What is the smallest unit of life?",
    "What part of a cell holds its genetic material?", "What is DNA?", "What is an ecosystem?",
    "What is a food chain?", "What do herbivores eat?", "What is erosion?", "How do volcanoes form?",
    "What causes earthquakes?", "What is the water cycle?", "What is friction?", "What is a magnet?",
    "What is an element in chemistry?", "What is the chemical formula for table salt?",
    "What gas do people breathe out?", "What is the largest organ of the human body?",
    "What is a mammal?", "How do fish breathe underwater?", "What is a fossil?",
    "What is the difference between a virus and a bacterium?", "What is the pH of pure water?",
    "What is the ozone layer?", "What is a solar eclipse?", "What is kinetic energy?",
    "What is a chemical reaction?", "What do the lungs do?", "What is an electrical insulator?",
    "How does sound travel?", "What is the main gas in Earth's atmosphere?",
    "What is a renewable energy source?", "What is an igneous rock?",
    "How do bats find their way in the dark?", "What is a habitat?", "What do plant roots do?",
    "What is the job of the kidneys?", "Why does ice float on water?", "What is a predator?",
    "What is the unit of electric current?", "What is a light year?",
    # Chinese: 科学与自然常识
    "心脏有什么作用？", "原子由什么组成？", "地球绕太阳转一圈要多久？", "什么是蒸发？",
    "物质有哪三种状态？", "火山是怎样形成的？", "地震是怎么产生的？", "什么是食物链？",
    "人呼出的气体主要是什么？", "植物的根有什么作用？", "什么是化石？", "什么是生态系统？",
    "离地球最近的恒星是哪颗？", "什么是摩擦力？", "声音是怎样传播的？", "什么是可再生能源？",
    "水的循环是怎样的？", "细胞是什么？", "月食是怎么回事？", "磁铁为什么能吸铁？",
]
PROMPTS = EVERYDAY + SCIENCE

# Greedy: the base model's most likely answer, the behaviour to keep. Long answers are cut at
# their last full sentence within the limit, so training rarely teaches stopping mid-sentence.
MAX_NEW_TOKENS = 96


def chosen_prompts(count: int) -> list[str]:
    """`count` distinct prompts, never repeated: a fixed shuffle of each kind, spread so that any
    count mixes everyday and science prompts in proportion, and both languages."""
    if not 0 <= count <= len(PROMPTS):
        raise ValueError(f"REPLAY={count}: must be between 0 and {len(PROMPTS)}, the number of "
                         "distinct prompts the kit ships (answers are never repeated)")
    spread = [((i + 0.5) / len(kind), prompt) for kind in (EVERYDAY, SCIENCE)
              for i, prompt in enumerate(random.Random(0).sample(kind, len(kind)))]
    # A stable order: REPLAY=n+k keeps the first n.
    return [prompt for _, prompt in sorted(spread, key=lambda pair: pair[0])][:count]


def whole_sentences(answer: str, ended: bool) -> str:
    if ended:
        return answer.strip()
    ends = [m.end() for m in re.finditer(r"[.!?。！？](?=\s|$)|[。！？]", answer)]
    return answer[:ends[-1]].strip() if ends else answer.strip()


def base_answers(base_model: str, count: int, load=None) -> list[tuple[str, str]]:
    """(prompt, answer) for `count` distinct prompts, answered by the base model itself (batched
    greedy, through chat/ in its own chat format), cached so a larger REPLAY only answers the new
    prompts; `load()` gives the model when one is new (default: load the base)."""
    prompts = chosen_prompts(count)
    answers = cached("replay", base_model, prompts, MAX_NEW_TOKENS, load)
    print(f"replay: {count} base-model answers")
    return [(p, whole_sentences(a.text, a.ended)) for p, a in zip(prompts, answers)]


def records(pairs: list[tuple[str, str]]) -> list[dict]:
    """Conversation records of the replayed answers (empty ones skipped: nothing to learn)."""
    from training.data import conversation
    return [conversation(prompt, answer) for prompt, answer in pairs if answer]
