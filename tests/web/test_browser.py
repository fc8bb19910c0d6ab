"""The web client in a real browser (Debian's chromium driven by Playwright) against a real cluster."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from chatstream_site.localcluster import Cluster
from chatstream_site.localservers import ROOT

pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
GENEROUS_IP_RATES = {"CHATSTREAM_RATE_REGISTER_IP": "100000/h", "CHATSTREAM_RATE_LOGIN_IP": "100000/h",
                     "CHATSTREAM_GATEWAY_RATE_SENSITIVE": "100000/m", "CHATSTREAM_GATEWAY_RATE_WS_IP": "100000/m"}
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-quic", "--disable-sync"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Each role in its own process group, unsupervised, so one broker stays down until the test restarts it.
    # Every test registers and logs in its own users from 127.0.0.1, more often in one module than the per-IP
    # limits on those routes allow (the api's 20 registrations an hour, the gateway's 30 sensitive requests and
    # 60 handshakes a minute; tests/api and tests/gateway check the limits themselves), so this cluster raises them.
    c = Cluster(tmp_path_factory.mktemp("browser-cluster"), supervised=False, **GENEROUS_IP_RATES)
    c.start()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `apt-get install chromium` (make test's bootstrap does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def register(cluster: Cluster, prefix: str) -> dict[str, str]:
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    user = {"username": name, "email": f"{name}@example.com", "password": "correct horse battery"}
    r = httpx.post(f"{cluster.url}/api/v1/auth/register", json=user, timeout=20)
    assert r.status_code == 201, r.text
    return user


def login_page(browser: Browser, cluster: Cluster, user: dict[str, str]) -> tuple[BrowserContext, Page]:
    ctx = browser.new_context(viewport={"width": 1100, "height": 760})
    page = ctx.new_page()
    page.goto(cluster.url + "/")
    page.get_by_label("Username").first.fill(user["username"])
    page.get_by_label("Password").first.fill(user["password"])
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
    return ctx, page


def broker_ports(cluster: Cluster) -> list[int]:
    return [cluster.port_base + 1, cluster.port_base + 2]


def established_to(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_chat(page: Page, title: str) -> None:
    page.locator("#conversation-list button", has_text=title).click()
    expect(page.locator("#chat-title")).to_have_text(title)


def send(page: Page, text: str) -> None:
    page.locator("#composer-input").fill(text)
    page.locator("#composer-input").press("Enter")


def test_two_people_chat_across_brokers(cluster: Cluster, browser: Browser) -> None:
    alice, bob = register(cluster, "alice"), register(cluster, "bob")
    actx, apage = login_page(browser, cluster, alice)
    bctx, bpage = login_page(browser, cluster, bob)
    try:
        # Least-connections balancing puts the two sockets on different brokers.
        counts = [established_to(p) for p in broker_ports(cluster)]
        assert sorted(counts) == [1, 1], counts

        apage.locator("#new-chat-username").fill(bob["username"])
        apage.get_by_role("button", name="Start").click()
        expect(apage.locator("#chat-title")).to_have_text(bob["username"])
        send(apage, "hi bob, it's alice")
        expect(apage.locator(".msg.mine .body").last).to_have_text("hi bob, it's alice")
        expect(apage.locator(".msg.pending")).to_have_count(0, timeout=10_000)  # acked

        row = bpage.locator("#conversation-list button", has_text=alice["username"])
        expect(row.locator(".badge")).to_have_text("1", timeout=15_000)
        shot(bpage, "conversation-list")  # bob's list: the new chat with its unread badge
        open_chat(bpage, alice["username"])
        expect(bpage.locator(".msg .body").last).to_have_text("hi bob, it's alice")
        expect(row.locator(".badge")).to_have_count(0)
        send(bpage, "hello alice!")
        expect(apage.locator(".msg:not(.mine) .body").last).to_have_text("hello alice!", timeout=15_000)
        expect(apage.locator(".msg.mine .seen")).to_have_count(1, timeout=15_000)  # bob read it
        shot(apage, "chat-alice")
        shot(bpage, "chat-bob")
    finally:
        actx.close()
        bctx.close()


def test_an_admin_adds_a_member_who_sees_the_group_appear(cluster: Cluster, browser: Browser) -> None:
    alice, bob, carol = (register(cluster, n) for n in ("alice", "bob", "carol"))
    actx, apage = login_page(browser, cluster, alice)
    cctx, cpage = login_page(browser, cluster, carol)
    try:
        group = f"team {uuid.uuid4().hex[:4]}"
        apage.locator("#new-group-name").fill(group)
        apage.locator("#new-group-members").fill(bob["username"])
        apage.get_by_role("button", name="Create").click()
        expect(apage.locator("#chat-title")).to_have_text(group)
        expect(cpage.locator("#conversation-list button", has_text=group)).to_have_count(0)
        apage.once("dialog", lambda d: d.accept(carol["username"]))
        apage.get_by_role("button", name="Add member").click()
        expect(cpage.locator("#conversation-list button", has_text=group)).to_have_count(1, timeout=15_000)
        send(apage, "welcome carol")
        open_chat(cpage, group)
        expect(cpage.locator(".msg .body").last).to_have_text("welcome carol", timeout=15_000)
    finally:
        actx.close()
        cctx.close()


def test_killing_the_broker_reconnects_and_shows_missed_messages_once(cluster: Cluster, browser: Browser) -> None:
    alice, bob = register(cluster, "alice"), register(cluster, "bob")
    actx, apage = login_page(browser, cluster, alice)
    bctx, bpage = login_page(browser, cluster, bob)
    try:
        apage.locator("#new-chat-username").fill(bob["username"])
        apage.get_by_role("button", name="Start").click()
        send(apage, "before the crash")
        open_chat(bpage, alice["username"])
        expect(bpage.locator(".msg .body").last).to_have_text("before the crash", timeout=15_000)

        # The two pages sit on different brokers (least connections), so killing broker 1 cuts one of them;
        # that page must show it, reconnect through the gateway to broker 2 and resume.
        counts = [established_to(p) for p in broker_ports(cluster)]
        assert sorted(counts) == [1, 1], counts
        victim = "broker1"
        record = """() => { window.__states = []; new MutationObserver(() => window.__states.push(
            document.getElementById('connection').dataset.state)).observe(
            document.getElementById('connection'), {attributes: true}); }"""
        for page in (apage, bpage):
            page.evaluate(record)
        cluster.kill_process(victim)
        for i in range(3):
            send(apage, f"during the outage {i}")
        for page in (apage, bpage):
            expect(page.locator("#connection")).to_have_text("live", timeout=30_000)
        seen = [page.evaluate("() => window.__states") for page in (apage, bpage)]
        assert sum("reconnecting" in states for states in seen) == 1, seen  # exactly the page that was cut
        assert sorted(established_to(p) for p in broker_ports(cluster)) == [0, 2]  # both on the survivor
        bodies = bpage.locator(".msg .body")
        expect(bodies).to_have_text(["before the crash", "during the outage 0", "during the outage 1",
                                     "during the outage 2"], timeout=30_000)
        cluster.start_process(victim)
    finally:
        actx.close()
        bctx.close()


def test_keyboard_only(cluster: Cluster, browser: Browser) -> None:
    alice, bob = register(cluster, "alice"), register(cluster, "bob")
    token = httpx.post(f"{cluster.url}/api/v1/auth/login", json={"username": bob["username"],
                       "password": bob["password"]}, timeout=20).json()["access"]
    r = httpx.post(f"{cluster.url}/api/v1/chats/single", json={"username": alice["username"]},
                   headers={"Authorization": f"Bearer {token}"}, timeout=20)
    assert r.status_code in (200, 201), r.text
    ctx = browser.new_context(viewport={"width": 390, "height": 800})  # a phone screen, too
    page = ctx.new_page()
    try:
        page.goto(cluster.url + "/")
        expect(page.locator("#login-username")).to_be_focused()
        page.keyboard.type(alice["username"])
        page.keyboard.press("Tab")
        page.keyboard.type(alice["password"])
        page.keyboard.press("Enter")
        expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
        target = page.locator("#conversation-list button", has_text=bob["username"])
        for _ in range(30):  # bounded: Tab until the conversation has focus
            if target.evaluate("el => el === document.activeElement"):
                break
            page.keyboard.press("Tab")
        else:
            raise AssertionError("the conversation is not reachable with Tab")
        page.keyboard.press("Enter")
        expect(page.locator("#composer-input")).to_be_focused()
        page.keyboard.type("typed without a mouse")
        page.keyboard.press("Enter")
        expect(page.locator(".msg.mine .body").last).to_have_text("typed without a mouse")
        expect(page.locator(".msg.pending")).to_have_count(0, timeout=10_000)
        shot(page, "phone-chat")
    finally:
        ctx.close()


def test_after_a_reload_presence_and_receipts_are_there_and_edits_happen_in_place(cluster: Cluster,
                                                                                   browser: Browser) -> None:
    alice, bob = register(cluster, "alice"), register(cluster, "bob")
    actx, apage = login_page(browser, cluster, alice)
    bctx, bpage = login_page(browser, cluster, bob)
    try:
        apage.locator("#new-chat-username").fill(bob["username"])
        apage.get_by_role("button", name="Start").click()
        send(apage, "read me")
        open_chat(bpage, alice["username"])
        expect(bpage.locator(".msg .body").last).to_have_text("read me", timeout=15_000)
        expect(apage.locator(".msg.mine .seen")).to_have_count(1, timeout=15_000)

        # A reload loses every live frame: presence and "seen" must come back from the API alone.
        apage.reload()
        expect(apage.locator("#connection")).to_have_text("live", timeout=20_000)
        row = apage.locator("#conversation-list button", has_text=bob["username"])
        expect(row.locator(".dot.online")).to_have_count(1, timeout=10_000)
        open_chat(apage, bob["username"])
        expect(apage.locator(".msg.mine .seen")).to_have_text("seen", timeout=10_000)
        apage.locator("#members-panel summary").click()
        expect(apage.locator("#member-list li")).to_have_count(2)

        # Edit in place: no browser prompt; Enter saves, and the other side sees the new text.
        apage.get_by_role("button", name="Edit message").last.click()
        box = apage.get_by_role("textbox", name="Edit message (Enter saves, Escape cancels)")
        expect(box).to_be_focused()
        box.fill("read me, edited")
        # A live frame redraws the list while the edit is open: the draft survives it (it was lost once, so
        # Enter saved the old text and nothing was sent).
        send(bpage, "still here")
        expect(apage.locator(".msg:not(.mine) .body").last).to_have_text("still here", timeout=15_000)
        expect(box).to_have_value("read me, edited")
        expect(box).to_be_focused()
        box.press("Enter")
        expect(bpage.locator(".msg .body", has_text="read me, edited")).to_have_count(1, timeout=15_000)
        expect(apage.locator(".msg.mine .body").last).to_have_text("read me, edited", timeout=15_000)
    finally:
        actx.close()
        bctx.close()


def test_a_group_names_each_sender_and_counts_readers(cluster: Cluster, browser: Browser) -> None:
    alice, bob, carol = (register(cluster, n) for n in ("alice", "bob", "carol"))
    actx, apage = login_page(browser, cluster, alice)
    bctx, bpage = login_page(browser, cluster, bob)
    try:
        group = f"crew {uuid.uuid4().hex[:4]}"
        apage.locator("#new-group-name").fill(group)
        apage.locator("#new-group-members").fill(f"{bob['username']}, {carol['username']}")
        apage.get_by_role("button", name="Create").click()
        expect(apage.locator("#chat-title")).to_have_text(group)
        send(apage, "hello crew")
        expect(bpage.locator("#conversation-list button", has_text=group)).to_have_count(1, timeout=15_000)
        open_chat(bpage, group)
        expect(bpage.locator(".msg .body").last).to_have_text("hello crew", timeout=15_000)
        expect(bpage.locator(".msg .sender").last).to_have_text(alice["username"], timeout=10_000)
        expect(apage.locator(".msg.mine .seen")).to_have_text("read by 1 of 2", timeout=15_000)
        send(bpage, "hi alice")
        expect(apage.locator(".msg:not(.mine) .sender").last).to_have_text(bob["username"], timeout=15_000)
    finally:
        actx.close()
        bctx.close()


def test_edit_history_opens_from_the_edited_label_and_admins_demote_and_delete(cluster: Cluster,
                                                                                browser: Browser) -> None:
    alice, bob = register(cluster, "alice"), register(cluster, "bob")
    actx, apage = login_page(browser, cluster, alice)
    bctx, bpage = login_page(browser, cluster, bob)
    try:
        group = f"history {uuid.uuid4().hex[:4]}"
        apage.locator("#new-group-name").fill(group)
        apage.locator("#new-group-members").fill(bob["username"])
        apage.get_by_role("button", name="Create").click()
        expect(apage.locator("#chat-title")).to_have_text(group)
        send(apage, "draft one")
        expect(apage.locator(".msg.pending")).to_have_count(0, timeout=10_000)  # acked
        apage.get_by_role("button", name="Edit message").last.click()
        box = apage.get_by_role("textbox", name="Edit message (Enter saves, Escape cancels)")
        box.fill("draft two")
        box.press("Enter")

        # Bob sees the "edited" label (a button) and opens the versions, oldest first.
        expect(bpage.locator("#conversation-list button", has_text=group)).to_have_count(1, timeout=15_000)
        open_chat(bpage, group)
        expect(bpage.locator(".msg .body").last).to_have_text("draft two", timeout=15_000)
        label = bpage.get_by_role("button", name="Show edit history")
        label.click()
        history = bpage.get_by_role("list", name="Edit history")
        expect(history.get_by_role("listitem")).to_have_count(2, timeout=10_000)
        expect(history.get_by_role("listitem").first).to_contain_text("draft one")
        expect(history.get_by_role("listitem").last).to_contain_text("draft two")
        expect(bpage.get_by_role("button", name="Hide edit history")).to_have_attribute("aria-expanded", "true")
        # Bob is no admin: no admin tools for him.
        expect(bpage.get_by_role("button", name="Delete group for every member")).to_be_hidden()

        # Alice promotes Bob, then demotes him again from the members list.
        apage.once("dialog", lambda d: d.accept(bob["username"]))
        apage.get_by_role("button", name="Make admin").click()
        apage.locator("#members-panel summary").click()
        demote = apage.get_by_role("button", name=f"Remove admin rights of {bob['username']}")
        expect(demote).to_have_count(1, timeout=10_000)
        apage.once("dialog", lambda d: d.accept())
        demote.click()
        expect(demote).to_have_count(0, timeout=10_000)
        expect(apage.get_by_role("button", name=f"Remove admin rights of {alice['username']} (you)")).to_have_count(1)

        # Alice deletes the group: it disappears from Bob's open page, live.
        apage.once("dialog", lambda d: d.accept())
        apage.get_by_role("button", name="Delete group for every member").click()
        expect(apage.locator("#conversation-list button", has_text=group)).to_have_count(0, timeout=10_000)
        expect(bpage.locator("#conversation-list button", has_text=group)).to_have_count(0, timeout=15_000)
        expect(bpage.locator("#chat-title")).to_have_text("Pick a conversation")
    finally:
        actx.close()
        bctx.close()


def test_reply_with_a_quote_that_jumps_to_the_original_and_react_by_keyboard(cluster: Cluster,
                                                                            browser: Browser) -> None:
    alice, bob = register(cluster, "alice"), register(cluster, "bob")
    actx, apage = login_page(browser, cluster, alice)
    bctx, bpage = login_page(browser, cluster, bob)
    try:
        apage.locator("#new-chat-username").fill(bob["username"])
        apage.get_by_role("button", name="Start").click()
        expect(apage.locator("#chat-title")).to_have_text(bob["username"])
        send(apage, "which day suits you?")
        for i in range(3):
            send(apage, f"filler {i}")
        expect(apage.locator(".msg.pending")).to_have_count(0, timeout=10_000)
        open_chat(bpage, alice["username"])
        expect(bpage.locator(".msg .body").last).to_have_text("filler 2", timeout=15_000)

        # Bob replies to the first message: the banner says to what, the reply carries the quote.
        bpage.get_by_role("button", name=f"Reply to {alice['username']}").first.click()
        expect(bpage.locator("#reply-banner")).to_contain_text(f"Replying to {alice['username']}: which day suits you?")
        expect(bpage.get_by_role("button", name="Cancel reply")).to_have_count(1)
        expect(bpage.locator("#composer-input")).to_be_focused()
        bpage.keyboard.type("Tuesday")
        bpage.keyboard.press("Enter")
        expect(bpage.locator("#reply-banner")).to_be_hidden()
        quote = apage.get_by_role("button", name="In reply to you: which day suits you?. Go to the original message")
        expect(quote).to_have_count(1, timeout=15_000)
        # The quote jumps to the original, by keyboard: it gets the focus.
        quote.focus()
        apage.keyboard.press("Enter")
        expect(apage.locator('li.msg[data-seq="1"]')).to_be_focused()

        # Bob reacts with the keyboard only: open the picker, the first emoji has the focus, Enter picks it.
        opener = bpage.get_by_role("button", name="Add reaction").first
        opener.focus()
        bpage.keyboard.press("Enter")
        picker = bpage.get_by_role("group", name="Pick a reaction")
        expect(picker.get_by_role("button")).to_have_count(12)
        expect(picker.get_by_role("button", name="React with thumbs up")).to_be_focused()
        bpage.keyboard.press("Enter")
        expect(picker).to_have_count(0)
        # Alice sees it live, with who reacted, and adds hers: a toggle button that says it is pressed.
        theirs = apage.get_by_role("button", name=f"thumbs up, 1: {bob['username']}. React with thumbs up")
        expect(theirs).to_have_count(1, timeout=15_000)
        expect(theirs).to_have_attribute("aria-pressed", "false")
        theirs.click()
        both = apage.get_by_role("button", name=f"thumbs up, 2: {bob['username']}, you. Remove your reaction")
        expect(both).to_have_attribute("aria-pressed", "true", timeout=15_000)
        expect(bpage.locator(".msg").first.locator("button.reaction")).to_have_text("👍 2", timeout=15_000)
        shot(apage, "reply-and-react")
        # After a reload both are still there (history carries quotes and reactions).
        apage.reload()
        expect(apage.locator("#connection")).to_have_text("live", timeout=20_000)
        open_chat(apage, bob["username"])
        expect(apage.locator(".msg").first.locator("button.reaction")).to_have_text("👍 2", timeout=15_000)
        expect(apage.get_by_role("button", name="In reply to you: which day suits you?. Go to the original message")
               ).to_have_count(1)
    finally:
        actx.close()
        bctx.close()


def test_mentions_search_and_read_by_in_a_group(cluster: Cluster, browser: Browser) -> None:
    alice, bob, carol = (register(cluster, n) for n in ("alice", "bob", "carol"))
    actx, apage = login_page(browser, cluster, alice)
    bctx, bpage = login_page(browser, cluster, bob)
    try:
        group = f"zoo {uuid.uuid4().hex[:4]}"
        apage.locator("#new-group-name").fill(group)
        apage.locator("#new-group-members").fill(f"{bob['username']}, {carol['username']}")
        apage.get_by_role("button", name="Create").click()
        expect(apage.locator("#chat-title")).to_have_text(group)
        send(apage, f"hey @{bob['username']}, the quokka is back")
        expect(apage.locator(".msg.pending")).to_have_count(0, timeout=10_000)

        # Bob's list counts the mention beside unread, and says so to a screen reader.
        row = bpage.get_by_role("button", name=f"{group}, 1 unread, 1 mention of you")
        expect(row).to_have_count(1, timeout=15_000)
        expect(row.locator(".mention-badge")).to_have_text("@1")
        shot(bpage, "mention-badge")
        open_chat(bpage, group)
        mark = bpage.locator(".msg .body.mentions-me mark.mention")
        expect(mark).to_have_text(f"@{bob['username']}", timeout=10_000)
        expect(bpage.locator(".msg .body").last).to_contain_text("(mentions you)")
        expect(bpage.locator("#conversation-list .mention-badge")).to_have_count(0)

        # Search: bob's own conversations only, the word marked; a hit opens its conversation.
        bpage.get_by_role("searchbox", name="Search messages").fill("QUOKKA")
        bpage.get_by_role("button", name="Search", exact=True).click()
        results = bpage.get_by_role("list", name="Search results")
        expect(results.get_by_role("listitem")).to_have_count(1, timeout=10_000)
        expect(results.locator("mark")).to_have_text("quokka")
        expect(bpage.locator("#search-status")).to_have_text("1 result")
        shot(bpage, "search-results")
        bpage.get_by_role("searchbox", name="Search messages").fill("giraffe")
        bpage.get_by_role("button", name="Search", exact=True).click()
        expect(bpage.locator("#search-status")).to_have_text("no results", timeout=10_000)

        # Read-by: "read by 1 of 2" under alice's message, opening the list of who read it; live, then
        # after a reload from the members endpoint.
        receipt = apage.locator(".msg.mine details.readers")
        expect(receipt.locator("summary")).to_have_text("read by 1 of 2", timeout=15_000)
        receipt.locator("summary").click()
        expect(apage.get_by_role("list", name="Read by").get_by_role("listitem")).to_have_text([bob["username"]])
        apage.reload()
        expect(apage.locator("#connection")).to_have_text("live", timeout=20_000)
        open_chat(apage, group)
        receipt = apage.locator(".msg.mine details.readers")
        expect(receipt.locator("summary")).to_have_text("read by 1 of 2", timeout=15_000)
        receipt.locator("summary").click()
        expect(apage.get_by_role("list", name="Read by").get_by_role("listitem")).to_have_text([bob["username"]])
        shot(apage, "read-by")
    finally:
        actx.close()
        bctx.close()
