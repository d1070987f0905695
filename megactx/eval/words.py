"""Offline word material for RULER's tasks.

RULER draws keys from wonderwords' adjective and noun lists and fills "essay" haystacks with Paul Graham's
essays, both downloads. Here the keys come from the lists below (adjective-noun pairs, as in RULER) and the
essay haystack is "essay-substitute": English sentences generated from a small seeded grammar over these words.
It is named as a substitute in every report; scores on it are not the published RULER numbers.
"""
from __future__ import annotations

import functools
import random

ADJECTIVES = """able absent abundant acoustic active adorable afraid agile alert alive amber ancient angry
anxious aquatic ardent arid august automatic awake bashful bitter blue bold brave breezy brief bright brisk
broad calm capable careful cheerful chilly civic clever cloudy clumsy coastal cold colossal common cool cosy
crimson crisp cuddly curious damp dapper daring dazzling deep delicate dense distant dizzy dry dusty eager
early earnest electric elegant empty endless even exotic faint fancy fearless feathered fierce filthy flat
fluffy foggy fond fragile frantic fresh friendly frosty fuzzy gentle giant gifted glad gleaming glossy golden
graceful grand green grumpy hairy handsome happy hardy harmless hasty heavy hidden hollow honest huge humble
hungry icy idle immense jagged jolly juicy keen kind large lazy level light little lively lonely loud lucky
lush magic majestic mellow merry mighty misty modern modest muddy narrow neat nervous nimble noble noisy odd
olive orange ornate pale patient peaceful perfect plain playful plucky polite proud purple quaint quick quiet
rapid rare ready regal rich rocky rough round royal rusty sandy scarlet shaggy sharp shiny short shy silent
silky silver simple sleepy slim slow small smooth snowy soft solid sour spicy spotted steady steep sticky
stormy striped strong sturdy sunny swift tall tame tender thick thin tidy tiny tough tranquil twin upbeat
vast velvet vivid warm wary wet whimsical wide wild windy wise witty wooden young zany zealous""".split()

NOUNS = """acorn actor airport album anchor ant apple arch army arrow attic badge bakery ball balloon banana
band barn basket bat beach beard bear bed bee bell bench berry bicycle bird blanket boat bone book boot bottle
box branch bread bridge brook brush bucket butter button cabin cactus cake camel camera candle canoe canyon
cap car carpet carrot castle cat cave cellar chair chalk cherry chest chicken chimney circle city cliff clock
cloud coat coffee comet compass cookie copper coral corn cottage cow crab crayon creek crow crown cup curtain
daisy deer desert desk diamond dinosaur dog dolphin door dragon drum duck eagle earth egg elbow elephant
engine falcon farm feather fence fern field fig finger fish flag flame flute fog forest fork fountain fox
frog garden gate giraffe glacier glass glove goat grape guitar hammer harbor hat hawk hill honey horse house
island jacket jar jelly kettle key kite knife ladder lake lamp lantern leaf lemon library lion lizard map
maple market meadow mirror monkey moon mountain mouse mushroom needle nest net notebook oak ocean onion orchard
otter owl paddle painter palace panda paper parrot peach pebble pencil penguin pepper piano pillow pine pipe
planet plum pond potato puppy quilt rabbit radio rain raven ribbon river road robin rocket rope rose saddle
sail salmon sand scarf school seal shadow shell ship shoe silk sky sled snail snake sock spoon squirrel stable
star stone storm stove stream street sugar sun swan table teapot tiger tomato tower tractor train tree trumpet
tulip tunnel turtle umbrella valley vase violin wagon wall walnut watch wave whale wheel willow window wolf
yard zebra""".split()

VERBS = """admired answered arranged asked baked borrowed built carried chased cleaned climbed collected
counted crossed described discovered drew earned explored fixed followed found gathered guided helped
imagined invented joined kept learned lifted mapped measured mended moved noticed opened painted planned
planted polished pulled pushed raised reached repaired returned sailed saved shared showed sketched sorted
studied tested traced traded visited washed watched weighed wrapped wrote""".split()

ADVERBS = """slowly quickly quietly carefully gladly rarely often always seldom eagerly calmly boldly
gently patiently suddenly finally""".split()


@functools.lru_cache(maxsize=1)
def key_words() -> list[str]:
    """RULER's needle keys: every adjective-noun pair, sorted."""
    return sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS})


def vocabulary(count: int, rng: random.Random) -> list[str]:
    """`count` distinct English words for common_words_extraction; made-up pronounceable words beyond the lists."""
    words = sorted(set(ADJECTIVES + NOUNS + VERBS))
    rng.shuffle(words)
    seen = set(words)
    while len(words) < count:
        word = "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words[:count]


def _sentence(rng: random.Random) -> str:
    a, n = rng.choice, NOUNS
    shapes = (
        lambda: f"The {a(ADJECTIVES)} {a(n)} {a(VERBS)} a {a(ADJECTIVES)} {a(n)} near the {a(n)}.",
        lambda: f"Every {a(n)} in the {a(ADJECTIVES)} {a(n)} {a(ADVERBS)} {a(VERBS)} the {a(n)}.",
        lambda: f"When the {a(n)} {a(VERBS)} the {a(n)}, the {a(ADJECTIVES)} {a(n)} {a(VERBS)} it {a(ADVERBS)}.",
        lambda: f"Nobody {a(VERBS)} the {a(ADJECTIVES)} {a(n)} until the {a(n)} was {a(ADJECTIVES)}.",
        lambda: f"In the {a(ADJECTIVES)} {a(n)}, a {a(n)} and a {a(n)} {a(VERBS)} {a(ADVERBS)}.",
        lambda: f"It is {a(ADJECTIVES)} to think that the {a(n)} {a(VERBS)} the {a(ADJECTIVES)} {a(n)}.",
    )
    return a(shapes)()


@functools.lru_cache(maxsize=4)
def essay_substitute_words(num_words: int) -> tuple[str, ...]:
    """The first `num_words` words of the essay substitute (the same text for every sample, as RULER's essays)."""
    rng = random.Random("essay-substitute")
    words: list[str] = []
    while len(words) < num_words:
        words.extend(_sentence(rng).split(" "))
    return tuple(words[:num_words])
