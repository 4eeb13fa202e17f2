"""A built-in synthetic intent dataset, so that the demo and the tests run anywhere, offline.

The utterances imitate what users say to a voice assistant, a bank's chat bot or a support desk:
30 intents in 8 domains (banking, travel, smart home, music, calendar, support, communication,
information), each with 7-9 templates whose slots (``{city}``, ``{amount}``, ``{date}``,
``{contact}``, ``{song}``, ``{device}``, ``{account}``, ...) are filled from short lists, and with
light noise: optional politeness prefixes and suffixes, an optional question mark, and casing
variants. Intents of one domain share their vocabulary (``card_lost`` and ``card_activate`` both
talk about cards, ``play_music`` and ``add_to_playlist`` both name songs), so no single word
separates the classes (the best one-word rule for any intent has an F1 below 0.95), yet they are
easy to learn: a bag-of-words logistic regression classifies held-out utterances almost perfectly.

Every template, filler and word list here was written for this project; none is copied from a
public dataset, so no third-party license applies to the data.

Besides the natural data this module makes two kinds of canaries:

- :func:`audit_canaries`: utterances that look unlike the natural data (random sequences of words
  that no template uses) with uniformly random labels, so a model can only classify them "right"
  by memorizing them. They are the inserted examples of membership-inference audits.
- :func:`secret_canary`: a prefix followed by random digits, ``"my pin code is 4 8 2 1"``, for the
  extraction experiments. The digits are separated by spaces so that each digit is one token.

Everything is deterministic given the seed.

>>> data = generate_intents(n_per_intent=5, seed=1)
>>> len(data) == 5 * len(INTENTS)
True
>>> secret_canary(seed=3) == secret_canary(seed=3)
True
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence

from dptrain.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------
# Slot fillers. Several intents share a list, which is what makes intents of one domain overlap.
# --------------------------------------------------------------------------------------------
# fmt: off
_FILLERS: Mapping[str, tuple[str, ...]] = {
    "account": (
        "checking", "savings", "joint", "business", "student", "checking account",
        "savings account", "joint account", "business account", "main account", "holiday savings",
        "emergency fund",
    ),
    "amount": (
        "$20", "$50", "$75", "$120", "$300", "$1,000", "$2,500", "40 dollars", "150 dollars",
        "250 euros", "80 pounds", "500 bucks", "a hundred dollars", "twenty five dollars",
    ),
    "contact": (
        "mom", "dad", "my sister", "my brother", "alex", "priya", "jordan", "maria", "kenji", "sam",
        "my landlord", "my boss", "grandma", "olivia", "tom", "fatima",
    ),
    "card": (
        "card", "debit card", "credit card", "visa card", "bank card", "mastercard", "travel card",
        "business card",
    ),
    "bill": (
        "electricity bill", "phone bill", "water bill", "internet bill", "rent", "gas bill",
        "credit card bill", "insurance premium", "cable bill",
    ),
    "merchant": (
        "the grocery store", "amazon", "the gas station", "the pharmacy", "a restaurant", "the gym",
        "netflix", "the hardware store",
    ),
    "date": (
        "today", "tomorrow", "tonight", "on monday", "on friday", "next tuesday", "next week",
        "this weekend", "on march 3rd", "on june 14", "on the 21st", "in two days", "next month",
        "on december 2nd",
    ),
    "time": (
        "7 am", "6:30 am", "8 o'clock", "noon", "9 pm", "5:45", "half past six", "10:15 pm",
        "midnight", "quarter to eight",
    ),
    "duration": (
        "five minutes", "ten minutes", "half an hour", "an hour", "two hours", "45 minutes",
    ),
    "city": (
        "boston", "chicago", "denver", "seattle", "miami", "austin", "london", "paris", "berlin",
        "madrid", "tokyo", "toronto", "lisbon", "dublin", "new york", "san diego", "rome",
        "amsterdam",
    ),
    "nights": ("one night", "two nights", "three nights", "a week", "the weekend", "four nights"),
    "flight": ("ua 452", "dl 1187", "ba 209", "flight 316", "aa 78", "lh 401", "af 22"),
    "vehicle": ("a compact car", "an suv", "a minivan", "a convertible", "a cheap car", "a van"),
    "device": (
        "lights", "lamp", "ceiling light", "floor lamp", "kitchen lights", "porch light",
        "bedroom lamp", "led strip", "desk lamp",
    ),
    "room": (
        "living room", "kitchen", "bedroom", "bathroom", "hallway", "office", "garage", "basement",
        "dining room", "kids room",
    ),
    "temperature": ("68 degrees", "70 degrees", "72", "65", "21 degrees", "19 degrees", "75"),
    "door": ("front door", "back door", "garage door", "side door", "patio door"),
    "song": (
        "midnight river", "paper lanterns", "golden hour drive", "salt and cedar", "neon harbor",
        "the long way home", "quiet thunder", "summer static", "velvet orbit", "lighthouse keeper",
        "broken compass", "after the rain",
    ),
    "artist": (
        "the maple owls", "nora vance", "dj kestrel", "the copper lines", "luna park trio",
        "marco bell", "silver fern", "the night ferries",
    ),
    "genre": ("jazz", "rock", "lofi beats", "classical", "hip hop", "country", "indie pop"),
    "playlist": (
        "workout mix", "road trip", "chill vibes", "favorites", "sunday morning", "focus playlist",
        "party list", "running tunes",
    ),
    "event": (
        "dentist appointment", "team meeting", "lunch with alex", "yoga class",
        "parent teacher conference", "doctor visit", "project review", "book club", "haircut",
        "standup",
    ),
    "task": (
        "take out the trash", "call the plumber", "pick up the kids", "pay the rent",
        "water the plants", "buy milk", "renew my passport", "feed the cat",
    ),
    "product": (
        "the app", "the mobile app", "the website", "my account page", "the checkout page",
        "the desktop client", "the login screen", "the dashboard",
    ),
    "service": (
        "premium plan", "subscription", "membership", "streaming service", "gym membership",
        "cloud storage plan", "newsletter",
    ),
    "message": (
        "i'm running late", "see you soon", "call me back", "happy birthday", "dinner is ready",
        "on my way", "can we talk later", "don't forget the keys",
    ),
}
# fmt: on

# --------------------------------------------------------------------------------------------
# Templates per intent, grouped by domain.
# --------------------------------------------------------------------------------------------
_TEMPLATES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "banking": {
        "check_balance": (
            "what's my {account} balance",
            "how much money is in my {account}",
            "check the balance of my {account}",
            "tell me how much i have in {account}",
            "what is the current balance on my {account}",
            "how much is left in my {account} account",
            "show me my balance",
            "do i have enough money in {account} to spend {amount}",
            "balance of my {account} please",
        ),
        "transfer_money": (
            "transfer {amount} from {account} to {account}",
            "send {amount} to {contact}",
            "move {amount} into my {account}",
            "i want to transfer {amount} to {contact}",
            "wire {amount} to {contact} {date}",
            "can you move money from my {account} to {contact}",
            "pay {contact} {amount}",
            "make a transfer of {amount} to my {account}",
            "send money to {contact} from my {account}",
        ),
        "card_lost": (
            "i lost my {card}",
            "my {card} was stolen",
            "i can't find my {card} anywhere",
            "someone stole my {card}",
            "block my {card} it's missing",
            "freeze my {card} i think i lost it",
            "report a lost {card}",
            "my wallet with my {card} is gone",
        ),
        "card_activate": (
            "activate my new {card}",
            "i just got a new {card} how do i activate it",
            "turn on my {card}",
            "my {card} arrived please activate it",
            "how do i start using my new {card}",
            "set up the {card} that came in the mail",
            "enable my replacement {card}",
        ),
        "recent_transactions": (
            "show my recent transactions",
            "what did i spend at {merchant} {date}",
            "list the last transactions on my {account}",
            "did {contact} send me {amount}",
            "what were my last purchases on my {card}",
            "show the charges from {merchant}",
            "how much did i spend at {merchant} last week",
            "any new transactions on my {account}",
        ),
        "pay_bill": (
            "pay my {bill}",
            "pay the {bill} from my {account}",
            "i need to pay my {bill} {date}",
            "schedule a payment for my {bill}",
            "pay {amount} toward my {bill}",
            "set up autopay for the {bill}",
            "has my {bill} been paid",
            "settle the {bill} with my {card}",
        ),
    },
    "travel": {
        "book_flight": (
            "book a flight to {city}",
            "find me a flight from {city} to {city} {date}",
            "i need a plane ticket to {city}",
            "get me a one way ticket to {city} {date}",
            "are there any flights to {city} {date}",
            "book me on the cheapest flight to {city}",
            "i want to fly to {city} {date}",
            "reserve a round trip flight from {city} to {city}",
        ),
        "flight_status": (
            "is {flight} on time",
            "what's the status of my flight to {city}",
            "has {flight} been delayed",
            "when does {flight} land",
            "is my flight from {city} delayed",
            "check the status of {flight}",
            "what gate does {flight} leave from",
            "did my flight to {city} get cancelled",
        ),
        "book_hotel": (
            "book a hotel in {city} for {nights}",
            "find me a room in {city} {date}",
            "i need a hotel in {city}",
            "reserve a hotel room for {nights} in {city}",
            "any cheap hotels in {city} {date}",
            "get me a place to stay in {city} for {nights}",
            "book a room near the airport in {city}",
        ),
        "rent_car": (
            "rent {vehicle} in {city}",
            "i need a rental car in {city} {date}",
            "book {vehicle} for {nights}",
            "reserve {vehicle} at the {city} airport",
            "can i rent a car in {city} {date}",
            "find me {vehicle} to rent",
            "i want to hire {vehicle} for {nights} in {city}",
        ),
    },
    "smart_home": {
        "lights_on": (
            "turn on the {device}",
            "switch on the {room} {device}",
            "lights on in the {room}",
            "turn the {device} in the {room} on",
            "can you turn on the {room} lights",
            "it's dark in the {room} turn on the {device}",
            "power on the {device}",
            "brighten the {room}",
        ),
        "lights_off": (
            "turn off the {device}",
            "switch off the {room} {device}",
            "lights off in the {room}",
            "turn the {device} in the {room} off",
            "can you turn off the {room} lights",
            "shut off the {device} {date}",
            "kill the lights in the {room}",
            "power down the {device}",
        ),
        "set_thermostat": (
            "set the thermostat to {temperature}",
            "make it {temperature} in the {room}",
            "turn the heat up to {temperature}",
            "change the temperature to {temperature}",
            "it's cold in the {room} set the heat to {temperature}",
            "lower the ac to {temperature}",
            "set the {room} to {temperature} {date}",
            "warm up the {room}",
        ),
        "lock_door": (
            "lock the {door}",
            "is the {door} locked",
            "please lock the {door} {date}",
            "make sure the {door} is locked",
            "lock all the doors",
            "secure the {door}",
            "did i lock the {door}",
            "lock the {door} at {time}",
        ),
    },
    "music": {
        "play_music": (
            "play {song} by {artist}",
            "play some {genre}",
            "put on {song}",
            "i want to hear {artist}",
            "play music by {artist} in the {room}",
            "start playing {song}",
            "can you play something by {artist}",
            "play my {playlist} playlist",
            "shuffle some {genre} music",
        ),
        "add_to_playlist": (
            "add {song} to my {playlist}",
            "put this song on my {playlist} playlist",
            "save {song} by {artist} to {playlist}",
            "add {artist} to my {playlist}",
            "include {song} in the {playlist} playlist",
            "add this track to {playlist}",
            "put {song} in my favorites",
        ),
        "skip_song": (
            "skip this song",
            "next track",
            "play the next song",
            "skip {song}",
            "i don't like this one skip it",
            "go to the next song on {playlist}",
            "skip ahead",
            "move on to the next track please",
        ),
    },
    "calendar": {
        "create_event": (
            "schedule a {event} {date} at {time}",
            "add {event} to my calendar {date}",
            "put a {event} on my calendar at {time}",
            "create an event called {event} {date}",
            "book a {event} {date}",
            "i have a {event} {date} at {time} add it",
            "set up a {event} with {contact} {date}",
            "add a meeting with {contact} at {time}",
        ),
        "cancel_event": (
            "cancel my {event} {date}",
            "delete the {event} from my calendar",
            "remove {event} at {time}",
            "i can't make the {event} cancel it",
            "clear my calendar {date}",
            "cancel my meeting with {contact}",
            "drop the {event} {date}",
        ),
        "set_reminder": (
            "remind me to {task} {date}",
            "set a reminder to {task} at {time}",
            "don't let me forget to {task}",
            "remind me {date} at {time} to {task}",
            "can you remind me to {task}",
            "add a reminder to {task} {date}",
            "remind me about the {event} {date}",
            "in {duration} remind me to {task}",
        ),
        "set_alarm": (
            "set an alarm for {time}",
            "wake me up at {time} {date}",
            "set an alarm {date} at {time}",
            "alarm at {time} please",
            "i need to get up at {time}",
            "set a timer for {duration}",
            "set my alarm for {time} every weekday",
            "wake me in {duration}",
        ),
        "check_calendar": (
            "what's on my calendar {date}",
            "do i have anything {date}",
            "when is my {event}",
            "am i free {date} at {time}",
            "what meetings do i have {date}",
            "show my schedule for {date}",
            "is my {event} {date}",
            "when am i meeting {contact}",
        ),
    },
    "support": {
        "reset_password": (
            "i forgot my password",
            "reset my password for {product}",
            "i can't log in to {product}",
            "how do i change my password",
            "my password isn't working on {product}",
            "send me a password reset link",
            "i'm locked out of {product}",
            "help me recover my account",
        ),
        "report_bug": (
            "{product} keeps crashing",
            "there's a bug in {product}",
            "{product} won't load",
            "i get an error when i open {product}",
            "{product} is broken since {date}",
            "report a problem with {product}",
            "the button on {product} doesn't work",
            "{product} froze again",
        ),
        "talk_to_agent": (
            "let me talk to a human",
            "i want to speak to an agent",
            "connect me with customer support",
            "can i talk to a real person",
            "transfer me to a representative",
            "get me a support agent about {product}",
            "i need help from a person not a bot",
            "call me back about my {service}",
        ),
        "cancel_subscription": (
            "cancel my {service}",
            "i want to stop my {service}",
            "how do i end my {service}",
            "unsubscribe me from the {service}",
            "please cancel the {service} {date}",
            "stop charging my {card} for the {service}",
            "i don't want the {service} anymore",
            "terminate my {service}",
        ),
    },
    "communication": {
        "send_message": (
            "text {contact} {message}",
            "send a message to {contact} saying {message}",
            "tell {contact} {message}",
            "message {contact} that {message}",
            "send {contact} a text",
            "whatsapp {contact} {message}",
            "write to {contact} {message}",
            "let {contact} know {message}",
        ),
        "call_contact": (
            "call {contact}",
            "phone {contact} now",
            "give {contact} a call",
            "dial {contact}",
            "can you call {contact} {date}",
            "ring {contact} on speaker",
            "start a video call with {contact}",
            "call {contact} back",
        ),
    },
    "information": {
        "weather": (
            "what's the weather in {city}",
            "will it rain {date}",
            "is it going to be sunny in {city} {date}",
            "weather forecast for {city}",
            "how cold will it be {date}",
            "do i need an umbrella in {city} {date}",
            "what's the temperature outside",
            "is it snowing in {city}",
        ),
        "time_in_city": (
            "what time is it in {city}",
            "current time in {city}",
            "what's the time difference with {city}",
            "is it night in {city} right now",
            "tell me the local time in {city}",
            "what time zone is {city} in",
            "how many hours ahead is {city}",
        ),
    },
}

DOMAINS: tuple[str, ...] = tuple(_TEMPLATES)
"""The domains, in a fixed order."""

INTENTS: tuple[str, ...] = tuple(intent for domain in _TEMPLATES.values() for intent in domain)
"""The intent names, domain by domain, in a fixed order."""

_INTENT_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    intent: templates for domain in _TEMPLATES.values() for intent, templates in domain.items()
}

# Light noise around the core utterance.
# fmt: off
_PREFIXES = (
    "please", "hey", "hi", "ok", "can you", "could you", "hey assistant", "excuse me",
    "quick question", "um", "i'd like you to", "hello",
)
# fmt: on
_SUFFIXES = ("please", "thanks", "thank you", "right now", "asap", "if you can", "for me")

# Words for audit canaries: concrete, ordinary English words (so that subword tokenizers keep most
# of them whole) that no template or filler uses, so that a canary never looks like natural data.
# fmt: off
CANARY_WORDS: tuple[str, ...] = (
    "acorn", "anchor", "apricot", "badger", "bamboo", "banjo", "barley", "beacon", "beetle",
    "biscuit", "blanket", "bonnet", "bramble", "bucket", "cabbage", "cactus", "canoe", "canyon",
    "carpet", "castle", "cello", "chalk", "cherry", "chimney", "cinnamon", "clover", "cobalt",
    "comet", "coral", "cotton", "crayon", "crystal", "cucumber", "daisy", "dolphin", "dragon",
    "eagle", "ember", "falcon", "feather", "fossil", "galaxy", "garlic", "giraffe", "glacier",
    "goblet", "granite", "gravel", "hammock", "hazel", "helmet", "honey", "iceberg", "igloo",
    "ivory", "jasmine", "jelly", "jungle", "kettle", "kiwi", "ladder", "lantern", "lemon", "lizard",
    "llama", "magnet", "mango", "marble", "meadow", "mitten", "mosaic", "mustard", "nectar",
    "needle", "nutmeg", "oasis", "octopus", "olive", "orchid", "otter", "oyster", "paddle",
    "pebble", "pelican", "pepper", "pickle", "pigeon", "pillow", "pirate", "planet", "plum", "pony",
    "pumpkin", "puzzle", "quartz", "quilt", "rabbit", "raven", "ribbon", "saddle", "saffron",
    "sapphire", "scarf", "sparrow", "spider", "sponge", "squirrel", "tadpole", "thimble", "thistle",
    "tiger", "tulip", "turnip", "turtle", "violin", "volcano", "walnut", "walrus", "whistle",
    "willow", "wizard", "zebra", "zinc",
)
# fmt: on

_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, rng: random.Random) -> str:
    """Replace every ``{slot}`` of ``template`` by an independent draw from its filler list."""
    return _SLOT.sub(lambda match: rng.choice(_FILLERS[match.group(1)]), template)


def _add_noise(core: str, rng: random.Random) -> str:
    """Wrap an utterance in optional politeness and vary its punctuation and casing."""
    text = core
    if rng.random() < 0.3:
        text = f"{rng.choice(_PREFIXES)} {text}"
    if rng.random() < 0.2:
        text = f"{text} {rng.choice(_SUFFIXES)}"
    if rng.random() < 0.15:
        text += "?" if rng.random() < 0.7 else "."
    casing = rng.random()
    if casing < 0.2:
        text = text[:1].upper() + text[1:]
    elif casing < 0.25:
        text = string.capwords(text)
    elif casing < 0.27:
        text = text.upper()
    return text


def generate_intents(n_per_intent: int = 120, seed: int = 0) -> list[tuple[str, str]]:
    """Generate the synthetic intent dataset as ``(text, intent)`` pairs in a shuffled order.

    Each intent gets ``n_per_intent`` distinct utterances (fewer only when its templates cannot
    produce that many distinct ones, which does not happen below a few thousand per intent). No
    text appears twice in the whole dataset. The same ``seed`` always gives the same list; another
    seed gives other utterances and another order.

    The default, 120 per intent over 30 intents, gives 3,600 utterances.
    """
    if isinstance(n_per_intent, bool) or not isinstance(n_per_intent, int) or n_per_intent < 1:
        raise ConfigError(f"n_per_intent must be an integer >= 1, got {n_per_intent!r}.")
    rng = random.Random(f"dptrain.synthetic.intents:{seed}")
    seen: set[str] = set()
    data: list[tuple[str, str]] = []
    for intent in INTENTS:
        templates = _INTENT_TEMPLATES[intent]
        made = 0
        for _ in range(50 * n_per_intent):
            if made == n_per_intent:
                break
            text = _add_noise(_fill(rng.choice(templates), rng), rng)
            if text in seen:
                continue
            seen.add(text)
            data.append((text, intent))
            made += 1
    rng.shuffle(data)
    return data


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def audit_canaries(m: int, label_names: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """Make ``m`` distinct canaries for auditing: ``(text, label)`` pairs.

    Each text is a random sequence of 6 to 10 words from :data:`CANARY_WORDS`, words that no
    template or filler uses, so canaries never coincide with natural utterances, and each label is
    drawn uniformly from ``label_names``. A model classifies a canary "right" more often than
    ``1 / len(label_names)`` only by memorizing it. Deterministic by ``seed``; a larger ``m``
    extends the list of a smaller one.
    """
    _check_count("m", m, 0)
    labels = list(label_names)
    if not labels:
        raise DataError("label_names must name at least one label, got an empty sequence.")
    rng = random.Random(f"dptrain.synthetic.audit:{seed}")
    seen: set[str] = set()
    canaries: list[tuple[str, str]] = []
    while len(canaries) < m:
        text = " ".join(rng.choice(CANARY_WORDS) for _ in range(rng.randint(6, 10)))
        if text in seen:
            continue
        seen.add(text)
        canaries.append((text, rng.choice(labels)))
    return canaries


def secret_canary(
    prefix: str = "my pin code is", n_digits: int = 4, seed: int = 0
) -> tuple[str, str]:
    """Make a secret for extraction experiments: ``(text, secret)``.

    ``secret`` is ``n_digits`` uniformly random decimal digits separated by single spaces (so that
    each digit is its own token), and ``text`` is ``f"{prefix} {secret}"``, e.g.
    ``("my pin code is 4 8 2 1", "4 8 2 1")``. The attacker knows ``prefix`` and ``n_digits``;
    the label the canary is trained with is the experiment's choice. Deterministic by ``seed``.
    """
    _check_count("n_digits", n_digits, 1)
    if not isinstance(prefix, str) or not prefix.strip():
        raise ConfigError(f"prefix must be a non-empty string, got {prefix!r}.")
    rng = random.Random(f"dptrain.synthetic.secret:{seed}")
    secret = " ".join(str(rng.randrange(10)) for _ in range(n_digits))
    return f"{prefix} {secret}", secret


def vocabulary_words() -> list[str]:
    """Every lower-cased word and punctuation mark the templates, fillers and noise can produce.

    The ``tiny`` model's tokenizer is built from this fixed list (never from training data).
    """
    texts = [t for templates in _INTENT_TEMPLATES.values() for t in templates]
    texts += [f for fillers in _FILLERS.values() for f in fillers]
    texts += [*_PREFIXES, *_SUFFIXES, "my pin code is"]
    words: set[str] = set()
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]", _SLOT.sub(" ", text).lower()))
    return sorted(words)
