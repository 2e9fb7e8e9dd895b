"""What the fake chats say: the turns of a todo-list assistant, system prompts, and the
metadata pools, as plain Python values (``rows`` encodes them once, before the rows).

Everything here is drawn from the ``random.Random`` and the Faker it is given, so the same
seed gives the same pools.
"""

from __future__ import annotations

import json
import random
from typing import NamedTuple

from chatdb.schema import USER_MESSAGE_MAX_CHARS

TURN_POOL = 4_000

_NOUNS = (
    "groceries", "dentist appointment", "car insurance", "electricity bill", "library books",
    "birthday present", "passport", "plants", "gym membership", "quarterly report", "slides",
    "invoice", "flight", "hotel", "vet appointment", "kitchen sink", "bike", "tax return",
    "team lunch", "photos", "recycling", "laundry", "oil change", "lease", "newsletter",
    "budget", "garden", "printer", "meeting notes", "wedding RSVP", "parcel", "prescription",
)  # fmt: skip
_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini")
_VERBS = (
    "buy", "call", "email", "book", "pay", "fix", "clean", "schedule", "renew", "return",
    "pick up", "water", "review", "send", "prepare", "order", "cancel", "organise",
)  # fmt: skip
_WHEN = ("today", "tomorrow", "tonight", "this weekend", "on Monday", "next week", "before Friday")
_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/126.0 Mobile Safari/537.36",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant that manages the user's todo list. Use the tools to add, "
    "list, complete, update and delete tasks. Be brief and confirm every change.",
    "You are TaskBot. Keep answers short, use the task tools for every change, and never "
    "invent task numbers.",
)
#: A conversation's metadata, when it has any: where the chat was started.
CONVERSATION_METADATA = tuple({"source": source} for source in ("web", "ios", "android"))


class Turn(NamedTuple):
    """A user message and the assistant's answer."""

    user: str
    title: str  # the conversation's title when this turn opens it
    reply: str
    metadata: dict  # the assistant message's
    tool_calls: list | None
    tool_results: list | None


def build_turns(rng: random.Random, fake) -> list[Turn]:
    nouns = _NOUNS
    sentences = [fake.sentence(nb_words=rng.randint(6, 16)) for _ in range(1_500)]
    turns = []
    for number in range(TURN_POOL):
        task = f"{rng.choice(_VERBS)} the {rng.choice(nouns)}"
        kind = rng.random()
        tools: list[str] = []
        if kind < 0.35:
            user = f"Add a task to {task} {rng.choice(_WHEN)}"
            tools = ["add_task"]
            reply = f"✅ I've created a new task: '{task.capitalize()}' (Task #{rng.randint(1, 400)})."
        elif kind < 0.55:
            user = rng.choice(
                ("What's on my list?", "Show me my tasks", f"What do I have {rng.choice(_WHEN)}?")
            )
            tools = ["list_tasks"]
            items = [
                f"{i + 1}. {rng.choice(_VERBS).capitalize()} the {rng.choice(nouns)}"
                for i in range(rng.randint(1, 6))
            ]
            reply = "Here are your tasks:\n" + "\n".join(items)
        elif kind < 0.68:
            user = f"Mark '{task}' as done"
            tools = ["list_tasks", "complete_task"]
            reply = f"Done! '{task.capitalize()}' is marked as complete. 🎉"
        elif kind < 0.76:
            user = f"Delete the task about the {rng.choice(nouns)}"
            tools = ["delete_task"]
            reply = "I've deleted that task. " + rng.choice(sentences)
        else:
            # Free-form questions: longer, no tools.
            user = " ".join(rng.choices(sentences, k=rng.choices((1, 2, 4, 8, 20), (40, 30, 18, 9, 3))[0]))
            if rng.random() < 0.5:
                user = user.rstrip(".") + "?"
            reply = "\n\n".join(
                " ".join(rng.choices(sentences, k=rng.randint(2, 6))) for _ in range(rng.randint(1, 4))
            )
        user = user[:USER_MESSAGE_MAX_CHARS]
        title = user if len(user) <= 60 else user[:57].rsplit(" ", 1)[0] + "..."
        metadata = {
            "tools_used": tools,
            "model": rng.choice(_MODELS),
            "processing_time_ms": int(rng.lognormvariate(7.0, 0.5)),
        }
        call_list = result_list = None
        if tools and rng.random() < 0.5:
            call_ids = [f"call_{number:05d}{i}" for i in range(len(tools))]
            call_list = [
                {
                    "id": cid,
                    "type": "function",
                    "function": {"name": tool, "arguments": json.dumps({"title": task})},
                }
                for cid, tool in zip(call_ids, tools, strict=True)
            ]
            result_list = [{"tool_call_id": cid, "output": {"status": "ok"}} for cid in call_ids]
        turns.append(Turn(user, title, reply, metadata, call_list, result_list))
    return turns


def user_metadata_pool(rng: random.Random) -> list[dict | None]:
    """Client details on about one user message in five, as in seed 002's example."""
    pool: list[dict | None] = [None] * 96
    for _ in range(24):
        pool.append(
            {"ip_address": f"203.0.113.{rng.randint(1, 254)}", "user_agent": rng.choice(_USER_AGENTS)}
        )
    return pool


def user_name_pools(fake) -> tuple[list[str], list[str]]:
    """First and last names, for the users' rows."""
    return [fake.first_name() for _ in range(300)], [fake.last_name() for _ in range(300)]


USER_EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
