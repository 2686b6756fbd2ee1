"""Write the tool-call data of tests/test_slow_gemma_tools.py (deterministic; re-run to rebuild):

  train.jsonl  user asks, the assistant answers with one call; one tool declared per chat
  val.jsonl    the same shape on values and phrasings training never saw (the held-out prompts)

    python tests/assets/gemma_tools/make_data.py

Why this shape: with the Hermes tool_use template the tool block is most of a chat's tokens, so each
chat declares only the tool it calls (about 170 tokens instead of ~600), has no system prompt (the
template's own preamble is the instruction) and ends at the call (the call is what is measured; a
tool result and an answer would double the tokens). Schemas are data/tools_schemas.json's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from qlocal.atomic import write_text

HERE = Path(__file__).resolve().parent
SCHEMAS = {t["function"]["name"]: t for t in json.loads((HERE.parents[2] / "data/tools_schemas.json").read_text())}

# Values split between training and held-out chats (index >= SPLIT of each list is held out).
CITIES = ["Paris", "Tokyo", "New York", "London", "Sydney", "Berlin", "Madrid", "Toronto", "Seoul", "Cairo",
          "Rome", "Lima", "Oslo", "Dublin", "Lisbon", "Vienna", "Nairobi", "Bangkok"]
ZONES = ["Europe/Paris", "Asia/Tokyo", "America/New_York", "Europe/London", "Australia/Sydney", "Europe/Berlin",
         "Europe/Madrid", "America/Toronto", "Asia/Seoul", "Africa/Cairo", "Europe/Rome", "America/Lima",
         "Europe/Oslo", "Europe/Dublin", "Europe/Lisbon", "Europe/Vienna", "Africa/Nairobi", "Asia/Bangkok"]
CODES = ["EUR", "USD", "JPY", "GBP", "CHF", "CAD", "AUD", "SEK", "NOK", "INR", "BRL", "MXN"]
TICKERS = ["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "GOOG", "META", "NFLX", "INTC", "ORCL", "IBM", "AMD"]
AIRPORTS = ["CDG", "JFK", "LHR", "HND", "FRA", "MAD", "SYD", "ICN", "YYZ", "DXB", "SFO", "AMS"]
EVENTS = ["Dentist", "Team meeting", "Yoga class", "Lunch with Sam", "Project review", "Piano lesson",
          "Call with the bank", "Book club", "Haircut", "Parents evening", "Tax appointment", "Gym session"]

# Phrasings per tool: the held-out chats use the last one of each list besides ones training uses.
ASK: dict[str, list[str]] = {
    "get_weather": ["What's the weather like in {city} right now?", "Is it raining in {city}?",
                    "How warm is it in {city} today?", "Weather in {city}, please.",
                    "Tell me the current weather in {city}.", "Do I need a coat in {city} today?"],
    "get_time": ["What time is it in {city}?", "Current local time in {city}?", "Tell me the time in {city}.",
                 "Is it late in {city} right now?", "What's the clock saying in {city}?", "Time check for {city}, please."],
    "convert_currency": ["How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.",
                         "What are {amount} {src} worth in {dst}?", "{amount} {src} to {dst}, please.",
                         "I have {amount} {src}. How many {dst} is that?", "Change {amount} {src} into {dst} for me."],
    "search_flights": ["Find a flight from {origin} to {dest} on {date}.", "Any flights {origin} to {dest} on {date}?",
                       "Search flights from {origin} to {dest} for {date}.", "I need to fly {origin}-{dest} on {date}.",
                       "Look up one-way flights {origin} to {dest}, {date}.", "Show me flights on {date} from {origin} to {dest}."],
    "get_stock_price": ["What's {ticker} trading at?", "Price of {ticker} stock?", "How much is one {ticker} share?",
                        "Give me the latest {ticker} quote.", "Check the {ticker} share price.", "Where is {ticker} trading now?"],
    "create_event": ["Add '{title}' to my calendar on {date} at {time}.", "Schedule {title} for {date} at {time}.",
                     "Put {title} in my calendar, {date} {time}.", "Create an event '{title}' on {date} at {time}.",
                     "Book {title} on {date}, {time}.", "Remind me: {title} on {date} at {time}."],
}


def _date(rng: random.Random) -> str:
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _pick(rng: random.Random, values: list[str], held_out: bool) -> str:
    cut = len(values) * 2 // 3
    return rng.choice(values[cut:] if held_out else values[:cut])


def _weather(rng: random.Random, h: bool) -> tuple[dict, dict]:
    city = _pick(rng, CITIES, h)
    return {"city": city}, {"city": city}


def _time(rng: random.Random, h: bool) -> tuple[dict, dict]:
    i = CITIES.index(_pick(rng, CITIES, h))
    return {"city": CITIES[i]}, {"timezone": ZONES[i]}


def _currency(rng: random.Random, h: bool) -> tuple[dict, dict]:
    src = _pick(rng, CODES, h)
    dst = rng.choice([c for c in CODES if c != src])
    amount = rng.choice([15, 20, 50, 75, 100, 250, 400, 1000, 1200]) + (0 if not h else 5)
    return ({"amount": amount, "src": src, "dst": dst},
            {"amount": amount, "from_currency": src, "to_currency": dst})


def _flights(rng: random.Random, h: bool) -> tuple[dict, dict]:
    origin = _pick(rng, AIRPORTS, h)
    dest = rng.choice([a for a in AIRPORTS if a != origin])
    date = _date(rng)
    return {"origin": origin, "dest": dest, "date": date}, {"date": date, "destination": dest, "origin": origin}


def _stock(rng: random.Random, h: bool) -> tuple[dict, dict]:
    t = _pick(rng, TICKERS, h)
    return {"ticker": t}, {"ticker": t}


def _event(rng: random.Random, h: bool) -> tuple[dict, dict]:
    title, date, time = _pick(rng, EVENTS, h), _date(rng), f"{rng.randint(7, 20):02d}:{rng.choice(['00', '15', '30', '45'])}"
    return {"title": title, "date": date, "time": time}, {"date": date, "time": time, "title": title}


VALUES: dict[str, Callable[[random.Random, bool], tuple[dict, dict]]] = {
    "get_weather": _weather, "get_time": _time, "convert_currency": _currency, "search_flights": _flights,
    "get_stock_price": _stock, "create_event": _event}


def record(rng: random.Random, name: str, k: int, held_out: bool) -> dict:
    """One chat: the user's request (phrasing k) and the assistant's call to `name`."""
    fill, args = VALUES[name](rng, held_out)
    return {"messages": [{"role": "user", "content": ASK[name][k].format(**fill)},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"id": f"call{rng.randrange(10**5):05d}", "type": "function",
                              "function": {"name": name, "arguments": args}}]}],
            "tools": [SCHEMAS[name]]}


def main(per_tool: int = 10, held_out_per_tool: int = 3) -> None:
    rng = random.Random(15)
    train, val = [], []
    for name in ASK:
        train += [record(rng, name, i % 5, False) for i in range(per_tool)]
        val += [record(rng, name, 5 if i == 0 else rng.randrange(5), True) for i in range(held_out_per_tool)]
    rng.shuffle(train)
    for path, rows in (("train.jsonl", train), ("val.jsonl", val)):
        write_text(HERE / path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(train)} training and {len(val)} held-out chats to {HERE}")


if __name__ == "__main__":
    main()
