"""Caption cleaning and quality flags: every flag fires on a crafted caption, and none fires
on realistic good captions (long paragraphs with quoted text, colour lists, common words)."""

from __future__ import annotations

import pytest

from curate.caption_qa import (
    FAILURE_FLAGS,
    INFO_FLAGS,
    CaptionQA,
    check_caption,
    clean_caption,
)
from curate.prompts import PromptSpec

LONG = PromptSpec("long", "Describe this image.", min_words=60, max_words=260, max_new_tokens=400)
SHORT = PromptSpec("short", "Caption this image.", min_words=3, max_words=15, max_new_tokens=48)

# Realistic long captions of the kind Qwen2-VL and friends write: 100-200 words, repeated
# common words, visible text in quotes, lists of colours, spatial language used again and
# again. None of them may raise any flag.
GOOD_LONG = [
    # street scene with signage in quotes
    "A narrow cobblestone street in an old European town at dusk, seen from a low angle near "
    "the middle of the road. On the left, a bakery with a dark green wooden facade displays "
    "loaves of bread and croissants in its lit window, and a hand-painted sign above the door "
    "reads \"BOULANGERIE DU COIN\" in gold serif letters. On the right, a row of three-storey "
    "houses in ochre, pale pink and cream have white shutters, and the shutters on the second "
    "floor are half closed. A woman in a long beige coat walks away from the camera towards "
    "the end of the street, where a stone church tower rises against a deep blue sky. Warm "
    "yellow light from the shop windows and from a single iron street lamp falls on the wet "
    "cobblestones, which reflect it in small bright patches. The colour palette is warm "
    "oranges and yellows against cool blues. The image is a sharp, realistic photograph with "
    "a shallow depth of field that leaves the church slightly soft.",
    # product shot, colour list
    "A pair of running shoes sits on a seamless light grey studio background, photographed "
    "from a three-quarter front angle at eye level. The left shoe is in front and slightly "
    "to the left of the right shoe, which is angled away so that its outer side faces the "
    "camera. The uppers are made of a breathable knitted mesh in a gradient of red, orange, "
    "yellow, green, blue and violet, running from the toe to the heel, and the thick foam "
    "midsoles are white with a thin black stripe. The laces are white, flat and tied in neat "
    "bows, and a small black logo tab on the tongue reads \"AIRSTRIDE\" in white capital "
    "letters. Soft, even light comes from a large source above and to the left, leaving a "
    "gentle shadow to the right of the shoes and a faint reflection on the floor. The "
    "composition is centred with generous empty space on both sides, in the clean style of "
    "a commercial e-commerce product photograph.",
    # watercolour landscape, repeated "the"/"of"
    "A watercolour painting of a mountain lake in the early morning. In the foreground, the "
    "edge of the lake is lined with tall grasses and a few smooth grey rocks, and the water "
    "is a pale turquoise that darkens towards the middle of the lake. In the middle ground, "
    "a dense forest of dark green pine trees covers the lower slopes of the mountains on "
    "both sides of the lake. In the background, three snow-capped peaks rise above the "
    "forest, the tallest of the three in the centre of the painting, and a thin layer of "
    "white mist drifts across the foot of the mountains. The sky is a soft gradient from "
    "light yellow near the horizon to pale blue at the top of the paper. The paint is "
    "applied in loose, transparent washes with visible blooms and soft edges, and the white "
    "of the paper shows through in the snow and the mist. The overall mood is calm and "
    "quiet, with a cool, limited palette of blues, greens and greys.",
    # food, overhead
    "An overhead view of a rustic wooden table set for breakfast for two. In the centre of "
    "the frame is a large white ceramic plate holding a stack of four golden pancakes topped "
    "with fresh blueberries, sliced strawberries and a drizzle of amber maple syrup that "
    "runs down the sides. To the left of the plate, a glass of orange juice stands beside a "
    "folded linen napkin in a muted sage green, and a silver fork and knife rest on the "
    "napkin. To the right, a white mug of black coffee sits on a small saucer, and behind it "
    "a small glass jar of honey has a wooden dipper leaning out of it. Scattered around the "
    "plate are a few loose blueberries and a sprig of mint. Soft natural daylight comes from "
    "the top of the frame, casting short, gentle shadows downwards. The colours are warm "
    "browns, creamy whites and bright reds and blues, in the style of a styled food "
    "photograph for a cookbook.",
    # digital illustration with text on a poster
    "A flat vector illustration of a retro science-fiction travel poster. A sleek silver "
    "rocket with red fins stands upright on a launch pad in the lower half of the poster, "
    "surrounded by white clouds of steam. Behind it, a large ringed planet in shades of "
    "peach and coral fills the upper right corner, and a smaller pale blue moon hangs in the "
    "upper left against a deep navy sky dotted with tiny white stars. Along the bottom, in "
    "bold cream-coloured capital letters, the text reads \"VISIT SATURN\" and beneath it, "
    "in smaller letters, \"Departures Daily from Earth Station 9\". The shapes are simple "
    "and geometric, with no outlines, subtle grain texture and limited gradients, and the "
    "palette is restricted to navy, coral, peach, cream, silver and red. The composition is "
    "vertical and symmetrical around the rocket, with a thin cream border framing the whole "
    "poster in the style of mid-century modern graphic design.",
    # portrait of animal, "very" and "the" repeated
    "A close-up portrait of a very old golden retriever lying on a dark blue sofa, its chin "
    "resting on a worn grey cushion. The dog's muzzle and the fur around its eyes have "
    "turned almost white, while the rest of its coat is a soft golden colour that looks "
    "very fluffy around the ears. Its brown eyes look directly at the camera, and its "
    "eyebrows are slightly raised. The dog's front paws are crossed in front of the cushion "
    "near the bottom edge of the frame. Behind the sofa, out of focus, a window lets in warm "
    "late-afternoon sunlight that lights the top of the dog's head and the tips of its ears "
    "and creates a soft glow along the edge of its fur. The background is a blur of cream "
    "and beige tones. The photograph is taken at the dog's eye level with a wide aperture, "
    "so only the eyes and nose are in sharp focus, and the mood is gentle and affectionate.",
    # city at night, several numbers and a quoted neon sign
    "A wide night-time photograph of a busy intersection in a large Asian city after rain. "
    "Tall buildings on both sides of the street are covered in bright neon and LED signs in "
    "pink, cyan, purple and yellow, many of them with Japanese characters, and the largest "
    "sign on the left reads \"KARAOKE 24H\" in glowing pink letters. In the middle of the "
    "frame, a crowd of pedestrians with umbrellas, most of them black and a few transparent, "
    "crosses the road on a wide zebra crossing. Two taxis, one white and one yellow, wait at "
    "the red light on the right, and their headlights reflect in long streaks on the wet "
    "asphalt. The camera is slightly elevated, looking down the street towards a vanishing "
    "point near the centre, where the buildings and the lights converge. The scene is "
    "saturated and high in contrast, with deep black shadows between the signs and a cool "
    "blue tint in the sky, in the style of cinematic street photography.",
    # 3D render interior
    "A 3D render of a minimalist Scandinavian living room with white walls and a light oak "
    "floor. A low grey fabric sofa stands against the back wall, with two cushions on it, "
    "one mustard yellow and one terracotta, and a chunky cream knitted throw draped over its "
    "right arm. In front of the sofa is a round white coffee table holding a stack of two "
    "books and a small ceramic vase with dried pampas grass. To the left, a tall fiddle-leaf "
    "fig in a woven basket stands next to a large window with sheer white curtains, through "
    "which bright, diffuse daylight enters and falls across the floor. On the wall above the "
    "sofa hang three framed abstract prints in black, beige and rust, evenly spaced in a "
    "row. The camera faces the sofa straight on at about chest height, with a wide field of "
    "view. The rendering is clean and photorealistic, with soft global illumination, gentle "
    "contact shadows and a calm, neutral palette.",
    # formulaic, as small VLMs write: "on the left side of the image" and its kin again and
    # again; its share of repeated word 4-grams is about 0.03
    "A modern kitchen with white cabinets and a large central island. On the left side of "
    "the image, a tall stainless steel refrigerator stands next to a white cabinet, and on "
    "the right side of the image, a black oven is built into a white cabinet below a gas "
    "hob. In the center of the image, the island has a white marble countertop with grey "
    "veins, and on the countertop there is a wooden cutting board with a loaf of bread, a "
    "bowl of green apples and a white vase of yellow tulips. In the background of the "
    "image, a large window lets in bright natural light, and on the left side of the window "
    "there is a shelf with white plates and glass jars. In the foreground of the image, "
    "three wooden bar stools with black metal legs stand in front of the island. The floor "
    "is made of light grey tiles, and the walls are painted white. The lighting is bright "
    "and even, and the image is a realistic photograph in the style of an interior design "
    "magazine.",
]

GOOD_SHORT = [
    "A golden retriever lying on a blue sofa",
    "Cobblestone street with a bakery at dusk.",
    "Watercolour painting of a mountain lake at dawn",
    "A retro travel poster reading \"VISIT SATURN\"",
    "Colourful running shoes on a grey background.",
    "Red, orange, yellow and green autumn leaves on wet grass",
    "Pancakes with berries and syrup, seen from above",
    "Neon-lit city intersection at night after the rain",
]


@pytest.mark.parametrize("text", GOOD_LONG)
def test_good_long_captions_raise_no_flag(text):
    assert 100 <= len(text.split()) <= 200  # the examples are what the long prompt asks for
    qa = check_caption(text, "stop", LONG)
    assert qa.flags == [] and qa.failures == [] and qa.ok and qa.reason is None
    assert qa.text == text and qa.words == len(text.split())


@pytest.mark.parametrize("text", GOOD_SHORT)
def test_good_short_captions_raise_no_flag(text):
    qa = check_caption(text, "stop", SHORT)
    assert qa.flags == [] and qa.ok and qa.text == text


def test_good_long_captions_with_line_breaks_are_joined_without_flags():
    text = GOOD_LONG[2].replace(". In the middle ground", ".\n\nIn the middle ground")
    qa = check_caption(text, "stop", LONG)
    assert qa.ok and qa.flags == [] and qa.text == GOOD_LONG[2]


# --- each failure fires -------------------------------------------------------------------

def test_backend_error_is_the_only_failure():
    qa = check_caption("", "error", LONG)
    assert qa.failures == ["backend_error"] and qa.reason == "backend_error" and not qa.ok
    assert check_caption(GOOD_LONG[0], "error", LONG).failures == ["backend_error"]


@pytest.mark.parametrize("text", ["", "   \n ", '""', "**  **", "```\n```"])
def test_empty(text):
    qa = check_caption(text, "stop", SHORT)
    assert qa.failures == ["empty"] and qa.text == "" and qa.words == 0


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with identifying people in images.",
    "I’m sorry, I cannot describe this image.",
    "Sorry, I am unable to view images.",
    "As an AI language model, I do not have the ability to see images.",
    "I cannot provide a description of this image because it appears to be blank.",
    "I am unable to provide a detailed description of this picture.",
    "I'm not able to identify the person in this photo.",
    "Unfortunately, I don't see an image attached to your message.",
    "There seems to be no image provided. Could you upload it again?",
    "I apologize, but I couldn't process the image you sent.",
])
def test_refusal(text):
    qa = check_caption(text, "stop", SHORT)
    assert "refusal" in qa.failures and qa.reason == "refusal"


def test_refusal_only_in_the_first_words_and_not_in_quoted_text():
    # Visible text that sounds like a refusal is a caption, not a refusal.
    sign = ('A white mug on a wooden desk with black lettering that reads "I can\'t even" '
            "next to a small potted cactus.")
    assert check_caption(sign, "stop", SHORT).failures == ["too_long"]  # 20 words > 15
    assert "refusal" not in check_caption(sign, "stop", LONG).failures
    late = GOOD_LONG[5] + " A handwritten note on the sofa says sorry, I cannot come today."
    assert "refusal" not in check_caption(late, "stop", LONG).flags
    # "AI-generated" is a style, not "As an AI, I ..."
    ai = "A surreal image rendered as an AI-generated collage of clocks and birds."
    assert check_caption(ai, "stop", SHORT).ok


@pytest.mark.parametrize("text", [
    # one word in a loop
    "A field of flowers, very very very very bright in the sun.",
    # a short phrase in a loop until the token limit
    "A red car parked on a street, a red car, a red car, a red car, a red car",
    # a list that keeps cycling
    "Colourful beads in red, blue, red, blue, red, blue, red, blue, red, blue.",
    # a whole sentence looping, longer than the n-gram periods checked back to back
    GOOD_LONG[1][:300] + " " + " ".join(
        ["The shoe has white laces tied in neat bows and a thick white foam sole."] * 8),
    # characters without spaces
    "A laughing child hahahahahahahahahahahahahahaha",
    "一只猫" + "的" * 12,
])
def test_repetition(text):
    qa = check_caption(text, "stop", LONG)
    assert "repetition" in qa.failures


def test_repetition_is_not_raised_by_natural_repeats():
    for text in [
        "On the left, a dog. On the left, a cat sits on a mat.",  # a phrase twice
        "A very very old tree in a field.",  # a word twice
        "A tick-tock clock on a tick-tock shelf in a quiet room.",
        "Red, red roses and red, red tulips in a red vase.",
        "A menu board listing Coffee.......... $3 and Tea.......... $2 in chalk.",
        "A banknote showing the number 1,000,000 in green ink.",
    ]:
        assert "repetition" not in check_caption(text, "stop", SHORT).flags, text


def test_truncated_by_token_limit():
    qa = check_caption(GOOD_LONG[0], "length", LONG)
    assert qa.failures == ["truncated"]
    # a short caption at its token limit too: the model did not finish it
    assert check_caption("A golden retriever lying on", "length", SHORT).failures == ["truncated"]


def test_truncated_mid_sentence_for_long_variants_only():
    cut = GOOD_LONG[3].rsplit(".", 2)[0] + ". The colours are warm browns, creamy whites and"
    assert check_caption(cut, "stop", LONG).failures == ["truncated"]
    assert check_caption(cut + ",", "stop", LONG).failures == ["truncated"]
    # short captions often end without a period
    assert check_caption("A golden retriever lying on a blue sofa", "stop", SHORT).ok
    # a long caption may end on a closed quotation, not on a cut-off one
    quote_end = GOOD_LONG[4].rsplit(".", 2)[0] + '. Across the top, the poster reads "VISIT SATURN"'
    assert check_caption(quote_end, "stop", LONG).ok
    assert check_caption(quote_end[:-1] + " TODAY", "stop", LONG).failures == ["truncated"]
    # terminal punctuation inside closing quotes or brackets ends a sentence
    assert check_caption(GOOD_LONG[4][:-1] + ' reading "SOON."', "stop", LONG).ok
    assert check_caption(GOOD_LONG[4][:-1] + " (bottom right).", "stop", LONG).ok


def test_too_short_and_too_long():
    assert check_caption("A dog.", "stop", SHORT).failures == ["too_short"]
    assert check_caption(GOOD_SHORT[1], "stop", LONG).failures == ["too_short"]
    qa = check_caption(GOOD_LONG[0], "stop", SHORT)
    assert qa.failures == ["too_long"] and qa.words > 100
    boundary = PromptSpec("b", "p", min_words=3, max_words=5, max_new_tokens=10)
    assert check_caption("one two three", "stop", boundary).ok
    assert check_caption("one two three four five", "stop", boundary).ok
    assert check_caption("one two", "stop", boundary).failures == ["too_short"]
    assert check_caption("one two three four five six", "stop", boundary).failures == ["too_long"]


def test_failures_follow_priority_order_and_flags_hold_every_flag():
    loop = "The image shows " + "a red car, " * 120
    qa = check_caption(loop, "length", LONG)
    assert qa.failures == ["repetition", "truncated", "too_long"]
    assert qa.reason == "repetition"
    assert qa.flags == ["repetition", "truncated", "too_long", "boilerplate_stripped"]
    refusal = check_caption("I'm sorry, I can't", "stop", LONG)
    assert refusal.failures == ["refusal", "truncated", "too_short"]
    assert list(FAILURE_FLAGS) == ["backend_error", "empty", "refusal", "repetition",
                                   "truncated", "too_short", "too_long"]
    assert set(INFO_FLAGS) == {"boilerplate_stripped", "markdown_stripped"}
    assert isinstance(qa, CaptionQA)


# --- cleaning -------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "clean"), [
    ("The image shows a red bicycle leaning against a wall.",
     "A red bicycle leaning against a wall."),
    ("This image depicts two children flying a kite on a beach.",
     "Two children flying a kite on a beach."),
    ("In this image, a woman is reading a book.", "A woman is reading a book."),
    ("In the image, there is a cat sleeping on a windowsill.",
     "A cat sleeping on a windowsill."),
    ("In this picture we can see a lighthouse on a cliff.", "A lighthouse on a cliff."),
    ("The picture features a bowl of ramen with a soft-boiled egg.",
     "A bowl of ramen with a soft-boiled egg."),
    ("This is an image of a snowy forest at night.", "A snowy forest at night."),
    ("An image of a vintage typewriter on a desk.", "A vintage typewriter on a desk."),
    ("The photo shows a crowded market.", "A crowded market."),
    ("THE IMAGE SHOWS: an empty parking lot.", "An empty parking lot."),
    ("This photograph captures a surfer riding a wave.", "A surfer riding a wave."),
    ("The image clearly shows a stop sign.", "A stop sign."),
    ("The image is a close-up photograph of a bee on a flower.",
     "A close-up photograph of a bee on a flower."),
    ("This is a cozy living room with a fireplace.", "A cozy living room with a fireplace."),
    ("Sure! Here is a detailed description of the image: The image shows a red barn.",
     "A red barn."),
    ("Certainly. Here's a caption: a goat on a rock.", "A goat on a rock."),
    ("Caption: A sailboat on a calm lake.", "A sailboat on a calm lake."),
    ('"The image shows a sailboat on a calm lake."', "A sailboat on a calm lake."),
    ("We can see three apples on a plate.", "Three apples on a plate."),
    ("In the scene there are two horses in a paddock.", "Two horses in a paddock."),
    ("Detailed description - a foggy pier at dawn.", "A foggy pier at dawn."),
])
def test_boilerplate_is_stripped(raw, clean):
    text, flags = clean_caption(raw)
    assert text == clean
    assert "boilerplate_stripped" in flags


@pytest.mark.parametrize("text", [
    "The painting depicts a woman in a red dress.",  # the medium is information
    "A screenshot of a spreadsheet with three columns.",
    "A photo of a dog on a beach.",
    "The picture of a saint hangs above the altar in a small chapel.",  # a thing in the scene
    "The image shows",  # nothing would be left: kept whole, and too short
    "Thermal image of a house showing heat loss around the windows.",
    "iPhone lying face down on a marble table.",
    "Okay Corral sign above a wooden saloon door.",
    "The frame features a gilded border around a small oval mirror.",
    "In the shot glass on the left, a slice of lime floats in clear liquid.",
    "Description-free packaging: a plain brown box tied with twine.",
])
def test_informative_openings_are_kept(text):
    assert clean_caption(text) == (text, [])


@pytest.mark.parametrize(("raw", "clean"), [
    ('"A cat on a mat."', "A cat on a mat."),
    ("“A cat on a mat.”", "A cat on a mat."),
    ("'A cat's toy on a mat.'", "A cat's toy on a mat."),
    ("  A cat on a mat.  \n", "A cat on a mat."),
    # quotes that open and close the caption but are not around it stay
    ('"OPEN" reads the sign above the "BAKERY"', '"OPEN" reads the sign above the "BAKERY"'),
    ("'Hello' and 'goodbye' are painted on the wall'", "'Hello' and 'goodbye' are painted on "
                                                        "the wall'"),
])
def test_surrounding_quotes_and_whitespace(raw, clean):
    assert clean_caption(raw) == (clean, [])


def test_markdown_is_stripped():
    raw = ("## Image Description\n\n**A red barn** stands in a *green* field.\n\n"
           "### Lighting\n- Soft morning light from the left.\n- Long shadows.\n"
           "1. A fence in front.")
    text, flags = clean_caption(raw)
    assert text == ("A red barn stands in a green field. Soft morning light from the left. "
                    "Long shadows. A fence in front.")
    assert flags == ["markdown_stripped"]
    text, flags = clean_caption("**Caption:** The image shows a goat.")
    assert text == "A goat." and flags == ["markdown_stripped", "boilerplate_stripped"]
    # a star that is not emphasis stays
    assert clean_caption("A 5* hotel sign and a 4* one.")[0] == "A 5* hotel sign and a 4* one."


def test_incomplete_last_sentence_is_kept_by_cleaning():
    text = "A dog runs on the beach. Behind it, the waves"
    assert clean_caption(text) == (text, [])

