#!/usr/bin/env python
"""Train the tiny SentencePiece tokenizer shipped as ``telechat_lab/assets/tiny_tokenizer.model``.

It is a stand-in for the real 131072-piece TeleChat2 tokenizer in the out-of-the-box demo and in the tests:
same SentencePiece settings family (BPE, byte fallback, split digits, identity normalizer, dummy prefix, extra
whitespace kept, whitespace-only pieces allowed), the same control pieces at the same ids 0..17
(``<_unk>`` ``<_start>`` ``<_end>`` ``<_pad>`` ``<_user>`` ``<_bot>`` ``<_system>`` ``<_observation>`` ``<_sep>``
``<_control1..9>``) and the same user-defined pieces at ids 18..133, but only a few thousand pieces.

The training text is generated here, from word lists and sentence patterns written for this script: English and
Chinese sentences, chat-style questions and answers, code, numbers and dates, JSON, tool definitions, tool calls
and tool results. Generation and training are deterministic (fixed seeds, one thread), so running the script
again rewrites the same file.

    python scripts/train_tiny_tokenizer.py [--out PATH] [--vocab-size 3072] [--lines 60000]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "telechat_lab" / "assets" / "tiny_tokenizer.model"

CONTROL_SYMBOLS = ["<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>"] + [
    f"<_control{i}>" for i in range(1, 10)
]
USER_DEFINED_SYMBOLS = (
    [str(d) for d in range(10)] + ["_", "\n", "\t", "__", "___", "____"] + [f"<reserve{i}>" for i in range(1, 101)]
)


def _words(text: str) -> list[str]:
    return text.split()


# ----------------------------------------------------------------------------------------------------------------
# Word lists (written for this script)
# ----------------------------------------------------------------------------------------------------------------

EN_NAMES = _words(
    "Alice Bob Carol David Emma Frank Grace Henry Iris Jack Kate Leo Mia Noah Olivia Paul Quinn Rosa Sam Tina"
)
EN_PLACES = _words(
    "Paris London Tokyo Beijing Shanghai Berlin Madrid Rome Cairo Sydney Toronto Delhi Seoul Moscow Lima "
    "Oslo Vienna Dublin Lisbon Prague"
)
EN_NOUNS = _words(
    "model data river mountain city garden teacher student computer network language book question answer "
    "problem solution engine market company project report kitchen recipe weather window door table "
    "letter story history science music painting library museum station airport hospital school friend "
    "family morning evening winter summer spring autumn coffee tea bread apple orange flower forest ocean "
    "island function variable server client request response token sentence paragraph image video camera "
    "phone battery memory processor keyboard screen file folder database query result error message "
    "system user assistant tool price number energy planet star moon cloud rain snow wind road bridge car "
    "train bicycle"
)
EN_VERBS = _words(
    "reads writes builds opens closes finds loves likes visits explains describes solves checks trains "
    "improves compares measures counts sends receives prints returns calls creates deletes updates loads "
    "saves learns teaches answers asks helps watches paints cooks plants carries moves starts stops"
)
EN_ADJS = _words(
    "small large quick slow bright dark warm cold new old simple complex careful happy quiet loud green "
    "blue red yellow ancient modern useful strange clear short long heavy light early late friendly "
    "famous"
)
EN_ADVS = _words("quickly slowly carefully quietly happily often rarely always never sometimes usually clearly")
EN_QUESTIONS = [
    "What is the capital of {place}?",
    "How do I {verb_base} a {noun} in Python?",
    "Can you explain how a {noun} works?",
    "Why is the {noun} so {adj} today?",
    "Please summarize the story about the {adj} {noun}.",
    "Translate the sentence into French: The {noun} is {adj}.",
    "Write a short poem about the {noun}.",
    "Which is better, a {noun} or a {noun2}?",
    "How many {noun}s are there in {place}?",
    "What does {name} think about the {noun}?",
    "Give me three tips for keeping a {noun} {adj}.",
    "Is it true that {name} {verb} the {noun} every {time}?",
]
EN_VERB_BASE = _words(
    "read write build open find visit explain describe solve check train improve compare measure count "
    "send sort parse load save print test fix clean"
)
EN_TIMES = _words("day week month year morning evening weekend Monday Friday")

ZH_SUBJECTS = _words(
    "我 你 他 她 我们 你们 他们 老师 学生 朋友 妈妈 爸爸 医生 工程师 科学家 孩子 同事 邻居 作者 用户 "
    "助手 模型 小明 小红 张三 李四 王老师 这家公司 研究院 团队"
)
ZH_VERBS = _words(
    "喜欢 学习 研究 讨论 阅读 编写 分析 参观 解释 完成 计算 设计 训练 测试 改进 比较 记录 发现 整理 翻译 "
    "回答 提出 购买 准备 打开 关闭 发送 接收 使用 保存 加载 创建 删除 更新 介绍 描述 总结 选择 帮助 支持"
)
ZH_OBJECTS = _words(
    "问题 答案 数据 模型 文章 故事 历史 科学 音乐 电影 城市 天气 春天 夏天 秋天 冬天 早餐 午饭 晚饭 水果 "
    "苹果 橙子 茶叶 咖啡 面包 米饭 蔬菜 公园 学校 医院 图书馆 博物馆 火车站 机场 电脑 手机 网络 代码 "
    "程序 函数 变量 文件 数据库 服务器 图片 视频 报告 计划 项目 任务 工具 语言 中文 英文 数学 物理 化学 "
    "地理 经济 市场 价格 电信 通信 人工智能 大模型 语义 知识 信息 系统 产品 服务 客户 技术 科技 公司 "
    "方法 结果"
)
ZH_ADJS = _words(
    "美丽 安静 热闹 重要 简单 复杂 有趣 困难 清楚 准确 快速 缓慢 温暖 寒冷 新鲜 古老 现代 有用 著名 友好 "
    "聪明 认真 仔细 明亮 干净 便宜 昂贵 漂亮 高效 稳定"
)
ZH_ADVS = _words("非常 特别 十分 比较 经常 总是 有时 已经 正在 马上 一起 认真地 仔细地 慢慢地 很")
ZH_PLACES = _words(
    "北京 上海 广州 深圳 杭州 南京 成都 重庆 西安 武汉 天津 苏州 长沙 青岛 厦门 中国 世界 城市里 家里 公司里"
)
ZH_TIMES = _words("今天 明天 昨天 早上 中午 晚上 周末 每天 去年 明年 最近 现在 以前 将来")
ZH_QUESTIONS = [
    "{obj}和{obj2}有什么区别？",
    "请问{place}的{obj}怎么样？",
    "如何用{lang}写一个{obj}程序？",
    "为什么{subj}{adv}{verb}{obj}？",
    "请帮我{verb}一下这个{obj}。",
    "你能介绍一下{place}吗？",
    "{time}{place}的天气如何？",
    "写一首关于{obj}的诗。",
    "请用一句话总结这篇关于{obj}的文章。",
    "{subj}应该怎样{verb}{obj}？",
    "这个{obj}{adv}{adj}吗？",
    "给我三个关于{obj}的建议。",
]
ZH_ANSWERS = [
    "{subj}认为{obj}{adv}{adj}，所以{time}要{verb}它。",
    "首先，{verb}{obj}；其次，{verb2}{obj2}；最后，{verb3}结果。",
    "好的，下面是关于{obj}的介绍：{obj}是一种{adj}的{obj2}，{adv}被用来{verb}{obj3}。",
    "{place}的{obj}{adv}{adj}，很多{subj}{time}都会去{verb}。",
    "抱歉，我无法确定这个问题的答案，但可以{verb}相关的{obj}。",
    "当然可以！{subj}可以先{verb}{obj}，然后再{verb2}{obj2}。",
    "根据{obj}的数据，{time}的{obj2}比{time2}{adj}一些。",
]
ZH_PUNCT_SENTENCES = [
    "{subj}{time}在{place}{verb}{obj}。",
    "{subj}{adv}{verb}{adj}的{obj}。",
    "{time}，{subj}和{subj2}一起{verb}了{obj}。",
    "“{obj}很{adj}！”{subj}说。",
    "{subj}觉得{obj}{adv}{adj}，但是{subj2}不同意。",
    "如果{subj}{verb}{obj}，就能{verb2}{obj2}。",
    "因为{obj}{adj}，所以{subj}{adv}{verb}它。",
    "{place}有{num}个{obj}，其中{num2}个是{adj}的。",
    "（注意：{obj}需要{adv}{verb}。）",
    "《{obj}与{obj2}》是一本{adj}的书。",
]
EN_SENTENCES = [
    "The {adj} {noun} {verb} the {noun2} {adv}.",
    "{name} {verb} a {adj} {noun} in {place}.",
    "In {place}, every {noun} is {adj} and {adj2}.",
    "Yesterday {name} and {name2} {verb} the {noun} together.",
    "If the {noun} is {adj}, the {noun2} {verb} it {adv}.",
    '"Is the {noun} {adj}?" asked {name}.',
    "There are {num} {noun}s and {num2} {noun2}s in the {noun3}.",
    "{name}'s {noun} costs ${num}.{num2}, which is {adj} for {place}.",
    "Note: the {noun} (and the {noun2}) must be {adj}; otherwise it fails.",
    "It's {adj} - really {adj2} - to see a {noun} like that!",
    "We {verb_base} the {noun} first, then we {verb_base2} the {noun2}.",
    "The {noun} was built in {year} and restored in {year2}.",
]
EN_ANSWERS = [
    "Sure! The {noun} {verb} the {noun2} because it is {adj}.",
    "The capital of {place} is {place2}.",
    "Here are three tips: 1. Keep the {noun} {adj}. 2. {verb_cap} it {adv}. 3. Check it every {time}.",
    "I am not sure, but I think {name} {verb} the {noun} {adv}.",
    "A {noun} is a {adj} kind of {noun2} that {verb} {noun3}s.",
    "Yes. In {year}, {name} {verb} the first {adj} {noun} in {place}.",
    "No, the {noun} is {adj}, not {adj2}.",
]
PY_NAMES = _words("data items result value count total index key text path config model batch tokens scores")
PY_FUNCS = _words("load_data parse_line compute_total train_model save_result clean_text count_words merge_items")
LANGS = _words("Python JavaScript C++ Go Rust Java SQL")
TOOL_NAMES = _words(
    "get_weather search_web calculator send_email get_stock_price translate_text book_ticket "
    "code_interpreter image_gen query_database"
)
PARAM_NAMES = _words(
    "city date query expression to subject body symbol text target_lang from_city to_city code prompt sql limit"
)
PARAM_TYPES = ["string", "integer", "number", "boolean"]


class Gen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def c(self, seq):
        return self.r.choice(seq)

    def num(self, lo: int = 0, hi: int = 1000) -> str:
        return str(self.r.randint(lo, hi))

    def fill(self, pattern: str) -> str:
        c, n = self.c, self.num
        verb_base = c(EN_VERB_BASE)
        return pattern.format(
            name=c(EN_NAMES),
            name2=c(EN_NAMES),
            place=c(EN_PLACES),
            place2=c(EN_PLACES),
            noun=c(EN_NOUNS),
            noun2=c(EN_NOUNS),
            noun3=c(EN_NOUNS),
            verb=c(EN_VERBS),
            verb_base=verb_base,
            verb_base2=c(EN_VERB_BASE),
            verb_cap=verb_base.capitalize(),
            adj=c(EN_ADJS),
            adj2=c(EN_ADJS),
            adv=c(EN_ADVS),
            time=c(EN_TIMES),
            num=n(2, 99),
            num2=n(0, 99),
            year=n(1900, 2030),
            year2=n(1950, 2030),
        )

    def fill_zh(self, pattern: str) -> str:
        c, n = self.c, self.num
        return pattern.format(
            subj=c(ZH_SUBJECTS),
            subj2=c(ZH_SUBJECTS),
            verb=c(ZH_VERBS),
            verb2=c(ZH_VERBS),
            verb3=c(ZH_VERBS),
            obj=c(ZH_OBJECTS),
            obj2=c(ZH_OBJECTS),
            obj3=c(ZH_OBJECTS),
            adj=c(ZH_ADJS),
            adv=c(ZH_ADVS),
            place=c(ZH_PLACES),
            time=c(ZH_TIMES),
            time2=c(ZH_TIMES),
            num=n(2, 500),
            num2=n(1, 99),
            lang=c(LANGS),
        )

    # --- kinds of text --------------------------------------------------------------------------------------
    def english(self) -> str:
        return " ".join(self.fill(self.c(EN_SENTENCES)) for _ in range(self.r.randint(1, 4)))

    def chinese(self) -> str:
        return "".join(self.fill_zh(self.c(ZH_PUNCT_SENTENCES)) for _ in range(self.r.randint(1, 4)))

    def qa(self) -> list[str]:
        if self.r.random() < 0.5:
            q, a = self.fill(self.c(EN_QUESTIONS)), self.fill(self.c(EN_ANSWERS))
        else:
            q, a = self.fill_zh(self.c(ZH_QUESTIONS)), self.fill_zh(self.c(ZH_ANSWERS))
        style = self.r.randint(0, 3)
        if style == 0:
            return [f"User: {q}", f"Assistant: {a}"]
        if style == 1:
            return [f"问：{q}", f"答：{a}"]
        if style == 2:
            return [q, "  " + a]  # answers sometimes start with spaces
        return [f"Q: {q} A: {a}"]

    def numbers(self) -> str:
        r, n = self.r, self.num
        kind = r.randint(0, 6)
        if kind == 0:
            a, b = r.randint(0, 9999), r.randint(0, 9999)
            op = r.choice("+-*")
            res = {"+": a + b, "-": a - b, "*": a * b}[op]
            return f"{a} {op} {b} = {res}"
        if kind == 1:
            return (
                f"{n(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} "
                f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}"
            )
        if kind == 2:
            return (
                f"{n(1990, 2030)}年{r.randint(1, 12)}月{r.randint(1, 28)}日，"
                f"温度{r.randint(-10, 40)}°C，湿度{n(10, 99)}%。"
            )
        if kind == 3:
            return (
                f"The price rose from ${n(1, 500)}.{r.randint(0, 99):02d} "
                f"to ${n(1, 900)}.{r.randint(0, 99):02d} ({r.uniform(-20, 20):+.1f}%)."
            )
        if kind == 4:
            return f"x = {r.uniform(-100, 100):.4f}, y = {r.uniform(0, 1):.3e}, n = {r.randint(0, 10**6):,}"
        if kind == 5:
            return f"{n(1, 20)}. {self.fill('{adj} {noun}').capitalize()}: {n(0, 100)} / {n(100, 200)}"
        return f"电话：1{r.randint(30, 99)}{r.randint(0, 99999999):08d}，编号 No.{n(100, 99999)}，共计{n(1, 9999)}元。"

    def code(self) -> list[str]:
        r, c = self.r, self.c
        f, a, b = c(PY_FUNCS), c(PY_NAMES), c(PY_NAMES)
        kind = r.randint(0, 4)
        if kind == 0:
            return [
                f"def {f}({a}, {b}=None):",
                f'    """{self.fill("The {noun} {verb} the {noun2}.")}"""',
                f"    {b} = {b} or []",
                f"    for i, x in enumerate({a}):",
                f"        if x % {r.randint(2, 9)} == 0:",
                f"            {b}.append(x * {r.randint(1, 99)})",
                f"    return {b}",
            ]
        if kind == 1:
            return [
                f"import {c(['os', 'json', 'math', 're', 'sys', 'torch', 'numpy as np'])}",
                f"{a} = [{', '.join(str(r.randint(0, 99)) for _ in range(r.randint(2, 6)))}]",
                f'print(f"{a}: {{len({a})}}")  # {self.fill("{adj} {noun}")}',
                f"with open('{b}.txt', 'w', encoding='utf-8') as fh:",
                f"    fh.write(str(sum({a})))",
            ]
        if kind == 2:
            return [
                f"function {f.replace('_', '')}({a}) {{",
                f"  const {b} = {a}.map((x) => x + {r.randint(1, 9)});",
                f"  return {b}.filter((x) => x > {r.randint(0, 50)});",
                "}",
                f"console.log({f.replace('_', '')}([1, 2, 3]));",
            ]
        if kind == 3:
            return [
                f"SELECT {a}, COUNT(*) AS {b}_count FROM {c(EN_NOUNS)}s",
                f"WHERE {b} > {r.randint(0, 100)} AND {a} LIKE '%{c(EN_NOUNS)}%'",
                f"GROUP BY {a} ORDER BY {b}_count DESC LIMIT {r.randint(1, 50)};",
            ]
        return [
            "```python",
            f"class {c(EN_NOUNS).capitalize()}{c(EN_NOUNS).capitalize()}:",
            "    def __init__(self, name: str) -> None:",
            "        self.name = name",
            f"        self._{a} = {{}}",
            "",
            "    def __repr__(self):",
            f'        return f"<{{self.name}} {a}={{len(self._{a})}}>"',
            "```",
        ]

    def tool_def(self) -> dict:
        r = self.r
        params = r.sample(PARAM_NAMES, r.randint(1, 3))
        return {
            "name": self.c(TOOL_NAMES),
            "description": self.fill(self.c(["{adj} {noun} service", "Returns the {noun} of a {noun2}"]))
            if r.random() < 0.5
            else self.fill_zh(self.c(["查询{obj}的工具", "根据{obj}返回{obj2}"])),
            "parameters": {
                "type": "object",
                "properties": {
                    p: {"type": self.c(PARAM_TYPES), "description": self.fill("the {noun}")} for p in params
                },
                "required": params[: r.randint(1, len(params))],
            },
        }

    def json_text(self) -> list[str]:
        r = self.r
        kind = r.randint(0, 3)
        if kind == 0:
            tool = self.tool_def()
            if r.random() < 0.7:
                tool = {"type": "function", "function": tool}
            return [json.dumps(tool, ensure_ascii=False)]
        if kind == 1:
            args = {
                p: self.c([self.c(EN_PLACES), self.c(ZH_PLACES), r.randint(0, 100), True])
                for p in r.sample(PARAM_NAMES, 2)
            }
            return [
                "<tool_call>",
                json.dumps({"name": self.c(TOOL_NAMES), "arguments": args}, ensure_ascii=False),
                "</tool_call>",
            ]
        if kind == 2:
            result = {
                "temp_c": r.randint(-10, 40),
                "sky": self.c(["clear", "cloudy", "rain", "晴", "多云"]),
                "ok": r.random() < 0.8,
            }
            return ["<tool_response>", json.dumps(result, ensure_ascii=False), "</tool_response>"]
        record = {
            "id": r.randint(1, 10**5),
            "name": self.c(EN_NAMES),
            "city": self.c(ZH_PLACES),
            "tags": r.sample(EN_ADJS, 2),
            "score": round(r.uniform(0, 100), 2),
            "note": None,
        }
        return [json.dumps(record, ensure_ascii=False, indent=self.c([None, 2]))]

    def misc(self) -> str:
        r = self.r
        kind = r.randint(0, 3)
        if kind == 0:
            return (
                f"https://www.{self.c(EN_NOUNS)}.com/{self.c(EN_NOUNS)}/{r.randint(1, 999)}"
                f"?q={self.c(EN_NOUNS)}&page={r.randint(1, 9)}"
            )
        if kind == 1:
            return f"{self.c(EN_NAMES).lower()}.{self.c(EN_NAMES).lower()}@{self.c(EN_NOUNS)}.org"
        if kind == 2:
            return f"# {self.fill('{adj} {noun}').title()}\n- {self.english()}\n- {self.chinese()}"
        return "    " + self.fill("{noun}_{noun2} = {num}") + "\t# " + self.fill_zh("{obj}")

    def lines(self, count: int) -> Iterator[str]:
        kinds = [self.english, self.chinese, self.qa, self.numbers, self.code, self.json_text, self.misc]
        weights = [20, 25, 18, 8, 10, 12, 7]
        produced = 0
        while produced < count:
            out = self.r.choices(kinds, weights)[0]()
            for text in [out] if isinstance(out, str) else out:
                for line in text.split("\n"):  # the trainer reads one line a sentence
                    if line.strip():
                        produced += 1
                        yield line


def train(out: Path, vocab_size: int, lines: int, seed: int) -> Path:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=Gen(seed).lines(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        max_sentencepiece_length=16,
        max_sentence_length=100000,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<_unk>",
        bos_piece="<_start>",
        eos_piece="<_end>",
        pad_piece="<_pad>",
        control_symbols=CONTROL_SYMBOLS,
        user_defined_symbols=USER_DEFINED_SYMBOLS,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=3072)
    parser.add_argument("--lines", type=int, default=60000, help="generated training lines")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()
    path = train(args.out, args.vocab_size, args.lines, args.seed)
    print(f"wrote {path} ({path.stat().st_size} bytes, {args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
