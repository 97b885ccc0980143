"""The history checker of the fault campaign: what the clients saw, judged after the run.

A history is a list of records (dicts, one JSON line each in the load's files):

- `write`: one create / update / upsert / delete by the single writer of (tenant, name), in its
  order `seq`: `op`, `expected` (expected_version, 0 = none), `tag` and `fp` (the content
  fingerprint of what it wrote; None for a delete), `node`, `start`, `end`, and the answer:
  `ok` with `version`, or `code` and `message`.
- `readback`: what the writer read right after write `seq` (retried until an answer came, so
  the state in between is the write's outcome): `state` None (absent) or {version, tag, fp}
  (fp None: the current version could not be fetched: `unreadable`).
- `read`: a Lookup or Fetch by a reader: `how`, `client`, `start`, `end`, `ok`, `version`,
  `tag` (None: several writes' values mixed), `fp` (fetches), or `code`.
- `event`: a Watch event a reader's stream delivered: `client`, `type`, `version`, `at`.
- `published`: after the run, with every fault healed, one stored version (current or
  retained) of a name: `version`, `current`, `tag` (its write's, from the record), `fp` of the
  bytes fetched from every layer (None: unreadable) and `error`.

Each name has one writer and each write a unique tag (also in its build_params, so a version
whose blobs are gone still names its write), so whether a write happened is decided by reading
back: after write k the name holds write k's tag (a put happened), is absent (a delete
happened), or still holds what it held before (nothing happened).

- lost acknowledged: a write answered OK that did not happen, or whose version, current right
  after it, could not be fetched;
- wrong answer: an error for a write that happened, unless the error says the outcome is
  unknown (`ambiguous`, counted apart), or a refusal whose reason is false (ALREADY_EXISTS for an
  absent name, FAILED_PRECONDITION when the expected version was current, NOT_FOUND for a
  present name); a write published twice; an OK with the wrong version;
- unreadable: a current version whose fetch failed or returned bytes that are not its write's;
- unreadable version: a published version (distinct tenant, name, version, tag) whose bytes
  could not all be fetched (a read-back during the run that kept failing, or the read of every
  stored version at the end) or are not its write's; the current version at the end must be
  the last state the writer read back;
- bad read: a read whose values mix writes, name a write never made, or carry other bytes or
  another version than the write's; stale read: a read older than a version the same client
  had already seen in a Watch event (the latest state with that version before the event).

Knows nothing of servers, faults or how the history was made.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

# A retryable error that says the write may have been applied (memdb.errors.OutcomeUnknown's
# messages) leaves the outcome open; DEADLINE_EXCEEDED and CANCELLED are the client's own
# give-up, open by nature (HUNG: the load abandoned a call that outlived its deadline).
UNKNOWN_OUTCOME = re.compile(
    r"outcome (is )?unknown|may have been applied|may or may not|reply was lost"
    r"|read the prefix before writing again",
    re.I,
)
OPEN_CODES = ("DEADLINE_EXCEEDED", "CANCELLED", "HUNG")
MAX_PROBLEMS = 50


def ambiguous(code: str, message: str) -> bool:
    """Whether an error answer leaves the write's outcome open (allowed either way)."""
    return code in OPEN_CODES or (code == "UNAVAILABLE" and bool(UNKNOWN_OUTCOME.search(message)))


@dataclass
class Verdict:
    writes: int = 0
    acknowledged: int = 0
    lost_acknowledged: int = 0
    wrong_answers: int = 0
    ambiguous: int = 0
    ambiguous_applied: int = 0
    late_applied: int = 0
    skipped_versions: int = 0
    unreadable_reads: int = 0
    published_versions: int = 0
    unreadable_versions: int = 0
    final_mismatches: int = 0
    reads_checked: int = 0
    bad_reads: int = 0
    stale_reads: int = 0
    write_errors: Counter = field(default_factory=Counter)
    read_errors: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["write_errors"] = dict(self.write_errors)
        out["read_errors"] = dict(self.read_errors)
        return out


@dataclass
class _Applied:
    """A state a name held: the write that made it (None: absent) and its version."""

    seq: int
    tag: int | None
    version: int
    since: float  # the start of the write that made it


def _same(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return a["tag"] == b["tag"] and a["version"] == b["version"]


def check(history: list[dict]) -> Verdict:
    v = Verdict()
    names: dict[tuple, list[dict]] = defaultdict(list)
    backs: dict[tuple, dict] = {}
    reads, events, published = [], [], []
    for r in history:
        key = (r.get("tenant"), r.get("name"))
        if r["kind"] == "write":
            names[key].append(r)
        elif r["kind"] == "readback":
            backs[key + (r["seq"],)] = r
        elif r["kind"] == "read":
            reads.append(r)
        elif r["kind"] == "event":
            events.append(r)
        elif r["kind"] == "published":
            published.append(r)
    ended = any(r["kind"] == "end" for r in history)
    final = {(p["tenant"], p["name"]): p for p in published if p["current"]} if ended else None
    unreadable: set[tuple] = set()  # (tenant, name, version, tag) found unreadable
    writes_by_tag: dict[tuple, dict] = {}
    timelines: dict[tuple, list[_Applied]] = {}
    for key, ops in names.items():
        ops.sort(key=lambda r: r["seq"])
        for op in ops:
            if op["tag"] is not None:
                writes_by_tag[key + (op["tag"],)] = op
        timelines[key] = _check_writes(v, key, ops, backs, writes_by_tag, final, unreadable)
    _check_reads(v, reads, writes_by_tag)
    _check_watch_order(v, reads, events, timelines)
    if ended:
        _check_published(v, published, writes_by_tag, timelines, unreadable)
    v.unreadable_versions = len(unreadable)
    return v


def _check_published(v: Verdict, published, writes_by_tag, timelines, unreadable) -> None:
    current = {}
    for p in published:
        key = (p["tenant"], p["name"])
        v.published_versions += 1
        if p["current"]:
            current[key] = p
        if p["fp"] is None:
            unreadable.add((*key, p["version"], p["tag"]))
            v.problem(
                f"{'/'.join(key)} published version {p['version']} (tag {p['tag']}) is "
                f"unreadable: {p['error']}"
            )
            continue
        bad = v.bad_reads
        _check_bytes(v, key, p, writes_by_tag, "published version")
        if v.bad_reads > bad:  # a published version that holds other bytes is unreadable too
            v.bad_reads = bad
            unreadable.add((*key, p["version"], p["tag"]))
    for key, timeline in timelines.items():
        last = timeline[-1]
        now = current.get(key)
        if (now is None) != (last.tag is None) or (now and now["tag"] != last.tag):
            v.final_mismatches += 1
            held = "nothing" if now is None else f"tag {now['tag']}"
            read = "nothing" if last.tag is None else f"tag {last.tag}"
            v.problem(f"{'/'.join(key)}: at the end holds {held}, its writer last read {read}")


def _check_writes(v: Verdict, key, ops, backs, writes_by_tag, final, unreadable) -> list[_Applied]:
    """Judge each write of one name from its read-back; the name's timeline of states. A last
    write whose read-back was cut off is judged from the name's state at the end."""
    where = "/".join(key)
    before: dict | None = None
    unapplied: dict[int, dict] = {}  # tag -> write that had not happened at its read-back
    seen_versions: dict[int, int] = {}  # tag -> version it was read with
    timeline = [_Applied(-1, None, 0, float("-inf"))]
    for op in ops:
        v.writes += 1
        back = backs.get(key + (op["seq"],))
        if back is None and final is not None and op is ops[-1]:
            now = final.get(key)
            back = {"state": now and {k: now[k] for k in ("version", "tag", "fp")}}
        if back is None:
            v.problem(f"{where} write {op['seq']}: no read-back recorded")
            continue
        after = back["state"]
        if after is not None:
            v.reads_checked += 1
            if after["fp"] is None:
                v.unreadable_reads += 1
                if after["version"] > 0:
                    unreadable.add((*key, after["version"], after["tag"]))
                v.problem(
                    f"{where} after write {op['seq']}: version {after['version']} "
                    f"(tag {after['tag']}) is current but cannot be fetched"
                )
            else:
                _check_bytes(v, key, after, writes_by_tag, f"read-back after write {op['seq']}")
            tag = after["tag"]
            if tag in seen_versions and seen_versions[tag] != after["version"]:
                v.wrong_answers += 1
                v.problem(
                    f"{where}: tag {tag} published as versions {seen_versions[tag]} and "
                    f"{after['version']} (one write published twice)"
                )
            seen_versions.setdefault(tag, after["version"])
        if op["op"] == "delete":
            happened = before is not None and after is None
        else:
            happened = after is not None and after["tag"] == op["tag"]
        late = None
        if not happened and not _same(after, before) and after is not None:
            late = unapplied.pop(after["tag"], None)
            if late is not None:
                v.late_applied += 1
                if not late["ok"] and not ambiguous(late["code"], late["message"]):
                    v.wrong_answers += 1
                    v.problem(
                        f"{where} write {late['seq']} ({late['op']}) answered "
                        f"{late['code']} but happened later"
                    )
        _judge(v, where, op, before, after, happened)
        if happened and op["ok"] and after is not None and after["fp"] is None:
            v.lost_acknowledged += 1  # acknowledged, current, and its bytes are gone
        if happened and op["op"] != "delete":
            want = before["version"] + 1 if before is not None else 1
            if after["version"] != want and before is not None and before["version"] >= 0:
                if unapplied:  # an older write may have applied unseen in between
                    v.skipped_versions += 1
                else:
                    v.wrong_answers += 1
                    v.problem(
                        f"{where} write {op['seq']} ({op['op']}) made version "
                        f"{after['version']} from {before['version']}: published twice"
                    )
        if not happened and op["tag"] is not None:
            unapplied[op["tag"]] = op
        if not _same(after, before):
            seq = op["seq"] if happened else (late["seq"] if late else op["seq"])
            timeline.append(
                _Applied(seq, after and after["tag"], after["version"] if after else 0, op["start"])
            )
        before = after
    return timeline


def _judge(v: Verdict, where: str, op: dict, before, after, happened: bool) -> None:
    what = f"{where} write {op['seq']} ({op['op']}, expected {op['expected']})"
    if op["ok"]:
        v.acknowledged += 1
        if not happened:
            v.lost_acknowledged += 1
            v.problem(f"{what} answered OK (version {op['version']}) but did not happen")
        elif op["op"] != "delete" and op["version"] != after["version"]:
            v.wrong_answers += 1
            v.problem(f"{what} answered version {op['version']}, stored as {after['version']}")
        elif op["op"] == "delete" and op["version"] != before["version"]:
            v.wrong_answers += 1
            v.problem(f"{what} answered deleted version {op['version']}, was {before['version']}")
        return
    code, message = op["code"], op["message"]
    v.write_errors[code] += 1
    if ambiguous(code, message):
        v.ambiguous += 1
        v.ambiguous_applied += happened
        return
    if happened:
        v.wrong_answers += 1
        v.problem(f"{what} answered {code} ({message[:120]}) but happened")
        return
    false_reason = (
        (code == "ALREADY_EXISTS" and before is None)
        or (
            code == "FAILED_PRECONDITION"
            and op["expected"]
            and before is not None
            and before["version"] == op["expected"]
        )
        or (code == "NOT_FOUND" and before is not None)
    )
    if false_reason and _same(before, after):
        v.wrong_answers += 1
        was = "absent" if before is None else f"at version {before['version']}"
        v.problem(f"{what} refused {code} ({message[:120]}) but the name was {was}")


def _check_bytes(v: Verdict, key, state: dict, writes_by_tag, what: str) -> None:
    write = writes_by_tag.get(key + (state["tag"],))
    where = "/".join(key)
    if write is None:
        v.bad_reads += 1
        v.problem(f"{where} {what}: tag {state['tag']} was never written to this name")
    elif state.get("fp") is not None and state["fp"] != write["fp"]:
        v.bad_reads += 1
        v.problem(
            f"{where} {what}: version {state['version']} holds bytes other than "
            f"write {write['seq']}'s"
        )
    elif write["ok"] and write["op"] != "delete" and write["version"] != state["version"]:
        v.bad_reads += 1
        v.problem(
            f"{where} {what}: tag {state['tag']} read as version {state['version']}, "
            f"acknowledged as {write['version']}"
        )


def _check_reads(v: Verdict, reads: list[dict], writes_by_tag) -> None:
    for r in reads:
        key = (r["tenant"], r["name"])
        if not r["ok"]:
            v.read_errors[f"{r['how']} {r['code']}"] += 1
            continue
        v.reads_checked += 1
        if r["tag"] is None:
            v.bad_reads += 1
            v.problem(
                f"{'/'.join(key)} {r['how']} version {r['version']}: values of several writes"
            )
            continue
        _check_bytes(v, key, r, writes_by_tag, r["how"])


def _check_watch_order(v: Verdict, reads, events, timelines) -> None:
    """A read must not return a state older than the one a Watch event showed the same client
    before the read started."""
    seen: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e["type"] == "put":
            seen[(e["client"], e["tenant"], e["name"])].append(e)
    for r in reads:
        if not r["ok"] or r["tag"] is None:
            continue
        timeline = timelines.get((r["tenant"], r["name"]))
        prior = [
            e for e in seen.get((r["client"], r["tenant"], r["name"]), ()) if e["at"] < r["start"]
        ]
        if not timeline or not prior:
            continue
        latest = max(prior, key=lambda e: e["at"])
        made = [
            s
            for s in timeline
            if s.version == latest["version"] and s.tag is not None and s.since < latest["at"]
        ]
        read = [s for s in timeline if s.tag == r["tag"]]
        if made and read and read[-1].seq < made[-1].seq:
            v.stale_reads += 1
            v.problem(
                f"{r['tenant']}/{r['name']} {r['how']} by {r['client']} returned version "
                f"{r['version']} after its Watch showed version {latest['version']}"
            )
