"""Write the tool-calling sample datasets (deterministic; re-run to rebuild):

  data/tools_sample.jsonl          OpenAI messages: `tools`, assistant `tool_calls` (content null or
                                   ""), `tool` results with tool_call_id/name, some `reasoning_content`
  data/tools_sample_sharegpt.json  the same chats in ShareGPT/LLaMA-Factory form: `function_call` /
                                   `observation` turns, `tools` as a JSON string, reasoning as <think>
  data/tools_schemas.json          every function schema (for data.tools or `qlocal chat --tools`)

    python data/make_tools_sample.py
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from qlocal.atomic import write_text

HERE = Path(__file__).resolve().parent


def fn(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


def s(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


SCHEMAS = {
    "get_weather": fn("get_weather", "Get the current weather for a city.",
                      {"city": s("City name, e.g. Paris"), "unit": s("Temperature unit", enum=["celsius", "fahrenheit"])},
                      ["city"]),
    "get_time": fn("get_time", "Get the current local time in an IANA time zone.",
                   {"timezone": s("IANA time zone, e.g. Europe/Paris")}, ["timezone"]),
    "convert_currency": fn("convert_currency", "Convert an amount between two currencies at today's rate.",
                           {"amount": {"type": "number", "description": "Amount to convert"},
                            "from_currency": s("ISO 4217 code, e.g. EUR"), "to_currency": s("ISO 4217 code, e.g. USD")},
                           ["amount", "from_currency", "to_currency"]),
    "search_flights": fn("search_flights", "Search one-way flights between two airports on a date.",
                         {"origin": s("IATA airport code"), "destination": s("IATA airport code"),
                          "date": s("Departure date, YYYY-MM-DD")}, ["origin", "destination", "date"]),
    "get_stock_price": fn("get_stock_price", "Get the latest price of a stock by its ticker symbol.",
                          {"ticker": s("Ticker symbol, e.g. AAPL")}, ["ticker"]),
    "create_event": fn("create_event", "Create a calendar event.",
                       {"title": s("Event title"), "date": s("YYYY-MM-DD"), "time": s("HH:MM, 24-hour")},
                       ["title", "date"]),
}

CITIES = [("Paris", "Europe/Paris"), ("Tokyo", "Asia/Tokyo"), ("New York", "America/New_York"),
          ("London", "Europe/London"), ("Sydney", "Australia/Sydney"), ("Berlin", "Europe/Berlin"),
          ("Madrid", "Europe/Madrid"), ("Toronto", "America/Toronto"), ("Seoul", "Asia/Seoul"),
          ("Cairo", "Africa/Cairo")]
SKIES = ["sunny", "cloudy", "light rain", "clear", "windy", "overcast"]
STOCKS = [("AAPL", 189.3), ("MSFT", 411.2), ("NVDA", 121.7), ("TSLA", 176.4), ("AMZN", 182.9)]
RATES = {("EUR", "USD"): 1.08, ("USD", "JPY"): 151.2, ("GBP", "EUR"): 1.17, ("USD", "EUR"): 0.93}
ROUTES = [("CDG", "JFK"), ("LHR", "HND"), ("FRA", "MAD"), ("SYD", "ICN"), ("YYZ", "LHR")]
SYSTEMS = [None, "You are a helpful assistant with access to tools.", "Answer briefly. Use a tool when it helps."]


def call(name: str, **args) -> dict:
    return {"name": name, "arguments": args}


def weather(rng: random.Random, city: str) -> tuple[dict, dict]:
    return call("get_weather", city=city), {"city": city, "temperature_c": rng.randint(-3, 33), "sky": rng.choice(SKIES)}


def conversations(rng: random.Random) -> list[dict]:
    """A neutral description of each chat: system, tools, and turns of user / calls+results / answer."""
    out = []
    for city, tz in CITIES:  # one call, one result, one answer
        c, r = weather(rng, city)
        out.append({"tools": ["get_weather", "get_time"], "turns": [
            ("user", f"What's the weather like in {city} right now?"), ("calls", [c], [r]),
            ("assistant", f"It is {r['temperature_c']} °C and {r['sky']} in {city}.")]})
        hour = rng.randint(0, 23)
        out.append({"tools": ["get_time", "get_weather"], "turns": [
            ("user", f"What time is it in {city}?"), ("calls", [call("get_time", timezone=tz)], [{"time": f"{hour:02d}:{rng.randint(0, 59):02d}", "timezone": tz}]),
            ("assistant", "")]})  # the answer is filled in from the result below
    for a, b in zip(CITIES[::2], CITIES[1::2]):  # two parallel calls, two results
        (c1, r1), (c2, r2) = weather(rng, a[0]), weather(rng, b[0])
        warmer = a[0] if r1["temperature_c"] >= r2["temperature_c"] else b[0]
        out.append({"tools": ["get_weather"], "think": f"I need both temperatures; {warmer} is warmer.", "turns": [
            ("user", f"Which is warmer right now, {a[0]} or {b[0]}?"), ("calls", [c1, c2], [r1, r2]),
            ("assistant", f"{warmer} is warmer: {r1['temperature_c']} °C in {a[0]} vs {r2['temperature_c']} °C in {b[0]}.")]})
    for (src, dst), rate in RATES.items():
        amount = rng.choice([20, 50, 100, 250, 1000])
        out.append({"tools": ["convert_currency", "get_stock_price"], "turns": [
            ("user", f"How much is {amount} {src} in {dst}?"),
            ("calls", [call("convert_currency", amount=amount, from_currency=src, to_currency=dst)],
             [{"amount": round(amount * rate, 2), "currency": dst}]),
            ("assistant", f"{amount} {src} is about {round(amount * rate, 2)} {dst}.")]})
    for ticker, price in STOCKS:
        out.append({"tools": ["get_stock_price", "convert_currency"], "turns": [
            ("user", f"What's {ticker} trading at?"), ("calls", [call("get_stock_price", ticker=ticker)],
                                                       [{"ticker": ticker, "price": price, "currency": "USD"}]),
            ("assistant", f"{ticker} is at {price} USD.")]})
    for origin, dest in ROUTES:  # multi-step: search, then book in the calendar
        day = f"2025-0{rng.randint(3, 9)}-{rng.randint(10, 28)}"
        flight = {"flight": f"{rng.choice(['AF', 'BA', 'LH', 'QF', 'AC'])}{rng.randint(100, 999)}", "departs": f"{rng.randint(6, 20):02d}:15"}
        out.append({"tools": ["search_flights", "create_event"], "turns": [
            ("user", f"Find me a flight from {origin} to {dest} on {day} and put it in my calendar."),
            ("calls", [call("search_flights", origin=origin, destination=dest, date=day)], [{"flights": [flight]}]),
            ("calls", [call("create_event", title=f"Flight {flight['flight']} {origin}-{dest}", date=day, time=flight["departs"])],
             [{"status": "created"}]),
            ("assistant", f"Booked in your calendar: flight {flight['flight']} from {origin} to {dest} on {day}, departing {flight['departs']}.")]})
    for q, a in [("What is the capital of Australia?", "Canberra."), ("How many days are in a leap year?", "366."),
                 ("Say hello in Spanish.", "Hola."), ("What is 12 times 12?", "144."),
                 ("Which planet is known as the Red Planet?", "Mars."), ("Translate 'thank you' into French.", "Merci."),
                 ("What is the boiling point of water at sea level in Celsius?", "100 °C."),
                 ("Name the largest ocean on Earth.", "The Pacific Ocean."), ("How many minutes are in two hours?", "120."),
                 ("What is the chemical symbol for gold?", "Au.")]:  # tools offered, none needed
        out.append({"tools": ["get_weather", "get_time"], "turns": [("user", q), ("assistant", a)]})
    for city, tz in CITIES[:5]:  # a follow-up question after a first answer
        c, r = weather(rng, city)
        hour = rng.randint(0, 23)
        out.append({"tools": ["get_weather", "get_time"], "think": f"get_time says {hour:02d}:30 in {tz}, that is {city}.", "turns": [
            ("user", f"Is it cold in {city}?"), ("calls", [c], [r]),
            ("assistant", f"It is {r['temperature_c']} °C in {city}, {r['sky']}."),
            ("user", "And what time is it there?"),
            ("calls", [call("get_time", timezone=tz)], [{"time": f"{hour:02d}:30", "timezone": tz}]),
            ("assistant", f"It is {hour:02d}:30 in {city}.")]})
    for i, conv in enumerate(out):
        conv["system"] = SYSTEMS[i % len(SYSTEMS)]
        for k, turn in enumerate(conv["turns"]):
            if turn == ("assistant", ""):
                result = conv["turns"][k - 1][2][0]
                conv["turns"][k] = ("assistant", f"It is {result['time']} in {result['timezone'].split('/')[-1].replace('_', ' ')}.")
    return out


def _id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))  # Mistral's 9 alphanumerics


def openai_record(conv: dict, rng: random.Random, n: int) -> dict:
    msgs: list[dict] = [{"role": "system", "content": conv["system"]}] if conv["system"] else []
    for turn in conv["turns"]:
        if turn[0] == "user":
            msgs.append({"role": "user", "content": turn[1]})
        elif turn[0] == "calls":
            ids = [_id(rng) for _ in turn[1]]
            # Alternate the two spellings a calling turn's empty content has in the wild, and the two of arguments.
            msgs.append({"role": "assistant", "content": None if n % 2 else "", "tool_calls": [
                {"id": i, "type": "function", "function": {
                    "name": c["name"], "arguments": json.dumps(c["arguments"]) if n % 3 else c["arguments"]}}
                for i, c in zip(ids, turn[1])]})
            msgs += [{"role": "tool", "tool_call_id": i, "name": c["name"], "content": json.dumps(r)}
                     for i, c, r in zip(ids, turn[1], turn[2])]
        else:
            msgs.append({"role": "assistant", "content": turn[1]})
    if conv.get("think"):  # reasoning on the final answer
        msgs[-1]["reasoning_content"] = conv["think"]
    return {"messages": msgs, "tools": [SCHEMAS[t] for t in conv["tools"]]}


def sharegpt_record(conv: dict) -> dict:
    turns = []
    for turn in conv["turns"]:
        if turn[0] == "user":
            turns.append({"from": "human", "value": turn[1]})
        elif turn[0] == "calls":
            calls = turn[1] if len(turn[1]) > 1 else turn[1][0]
            turns.append({"from": "function_call", "value": json.dumps(calls)})
            turns.append({"from": "observation", "value": json.dumps(turn[2] if len(turn[2]) > 1 else turn[2][0])})
        else:
            turns.append({"from": "gpt", "value": turn[1]})
    if conv.get("think"):
        turns[-1]["value"] = f"<think>\n{conv['think']}\n</think>\n\n{turns[-1]['value']}"
    rec = {"conversations": turns, "tools": json.dumps([SCHEMAS[t]["function"] for t in conv["tools"]])}
    if conv["system"]:
        rec["system"] = conv["system"]
    return rec


def main() -> None:
    convs = conversations(random.Random(15))
    rng = random.Random(1515)
    write_text(HERE / "tools_sample.jsonl",
               "".join(json.dumps(openai_record(c, rng, n), ensure_ascii=False) + "\n" for n, c in enumerate(convs)))
    write_text(HERE / "tools_sample_sharegpt.json",
               json.dumps([sharegpt_record(c) for c in convs], ensure_ascii=False, indent=1) + "\n")
    write_text(HERE / "tools_schemas.json", json.dumps(list(SCHEMAS.values()), indent=2) + "\n")
    print(f"wrote {len(convs)} chats to tools_sample.jsonl and tools_sample_sharegpt.json, "
          f"{len(SCHEMAS)} schemas to tools_schemas.json")


if __name__ == "__main__":
    main()
