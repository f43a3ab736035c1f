"""The dashboard's workflows pages: the layered layout of a graph (unit tests),
the list, and one workflow drawn live in a real browser against a real worker:
colours change as steps run, cancel and retry from the page, escaping,
read-only mode. Screenshots of the list, a fan-in mid-run and a map-reduce."""

from __future__ import annotations

import asyncio
import itertools
import re
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

import taskq
from taskq.dashboard import Dashboard, no_auth
from taskq.dashboard import _graph as graph
from taskq.dashboard.pages import workflows as workflows_page

from .dashboard_support import Browser, browser, csrf_form, serve

pytestmark = pytest.mark.anyio

NO_RETRY = taskq.Retry(attempts=1)
SCRIPT = "<script>document.title='pwned'</script>"


# -- layout ------------------------------------------------------------------------------


def check_layout(nodes: list[str], edges: list[tuple[str, str]]) -> graph.Layout:
    """The layout's invariants, whatever the graph."""
    drawn = graph.layout(nodes, edges)
    assert set(drawn.boxes) == set(nodes)
    for s, t in edges:
        assert drawn.boxes[s].layer < drawn.boxes[t].layer, (s, t)
    # Longest path: a node sits one layer after its furthest parent (roots at 0).
    for key, box in drawn.boxes.items():
        parents = [s for s, t in edges if t == key]
        want = max((drawn.boxes[p].layer for p in parents), default=-1) + 1
        assert box.layer == want, key
    for a, b in itertools.combinations(drawn.boxes.values(), 2):
        apart = (
            a.x + a.width <= b.x
            or b.x + b.width <= a.x
            or a.y + a.height <= b.y
            or b.y + b.height <= a.y
        )
        assert apart, (a, b)
    for box in drawn.boxes.values():
        assert box.x >= 0 and box.y >= 0
        assert box.x + box.width <= drawn.width and box.y + box.height <= drawn.height
    # Every edge leaves its source's right side and ends on its target's left side.
    for e in drawn.edges:
        src, dst = drawn.boxes[e.source], drawn.boxes[e.target]
        start = re.match(r"M([\d.]+),([\d.]+)", e.d)
        end = re.search(r"([\d.]+),([\d.]+)$", e.d)
        assert start and end
        assert float(start[1]) == pytest.approx(src.x + src.width)
        assert float(start[2]) == pytest.approx(src.center_y, abs=0.1)
        assert float(end[1]) == pytest.approx(dst.x)
        assert float(end[2]) == pytest.approx(dst.center_y, abs=0.1)
    return drawn


def test_a_chain_is_one_straight_row() -> None:
    nodes = [f"s{i}" for i in range(5)]
    drawn = check_layout(nodes, list(itertools.pairwise(nodes)))
    assert [drawn.boxes[n].layer for n in nodes] == [0, 1, 2, 3, 4]
    assert len({drawn.boxes[n].y for n in nodes}) == 1
    assert drawn.crossings == 0
    assert all(" C" in e.d and " L" not in e.d for e in drawn.edges)


def test_a_diamond_has_its_middle_in_one_layer_and_is_symmetric() -> None:
    edges = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
    drawn = check_layout(["a", "b", "c", "d"], edges)
    assert drawn.layers == (("a",), ("b", "c"), ("d",))
    b, c = drawn.boxes["b"], drawn.boxes["c"]
    assert drawn.boxes["a"].center_y == pytest.approx((b.center_y + c.center_y) / 2)
    assert drawn.boxes["d"].center_y == pytest.approx(drawn.boxes["a"].center_y)
    assert drawn.crossings == 0


def test_fan_out_and_fan_in_of_12() -> None:
    parts = [f"part{i}" for i in range(12)]
    edges = [("split", p) for p in parts] + [(p, "join") for p in parts]
    drawn = check_layout(["split", *parts, "join"], edges)
    assert drawn.layers == (("split",), tuple(parts), ("join",))
    assert drawn.crossings == 0
    ys = [drawn.boxes[p].center_y for p in parts]
    assert ys == sorted(ys)  # input order kept when nothing is better
    middle = (ys[0] + ys[-1]) / 2
    assert drawn.boxes["split"].center_y == pytest.approx(middle)
    assert drawn.boxes["join"].center_y == pytest.approx(middle)


def test_a_long_edge_goes_around_the_boxes_between() -> None:
    # a -> b -> c -> d and a -> d: the long edge passes layers 1 and 2
    # beside b and c, never through them.
    edges = [("a", "b"), ("b", "c"), ("c", "d"), ("a", "d")]
    drawn = check_layout(["a", "b", "c", "d"], edges)
    assert [drawn.boxes[k].layer for k in "abcd"] == [0, 1, 2, 3]
    long = next(e for e in drawn.edges if (e.source, e.target) == ("a", "d"))
    assert long.d.count(" L") == 2  # straight across the two layers it spans
    for key in "bc":
        box = drawn.boxes[key]
        straight = re.findall(r"L([\d.]+),([\d.]+)", long.d)
        for _x, y in straight:
            assert not box.y <= float(y) <= box.y + box.height


def test_crossings_are_reduced() -> None:
    # Drawn in input order, x1's and x2's children cross; the sweeps untangle them.
    edges = [("x1", "b2"), ("x2", "b1"), ("x1", "c2"), ("x2", "c1"), ("b1", "c1"), ("b2", "c2")]
    drawn = check_layout(["x1", "x2", "b1", "b2", "c1", "c2"], edges)
    assert drawn.crossings == 0


def test_a_cycle_is_refused_and_strays_are_ignored() -> None:
    with pytest.raises(ValueError, match="cycle"):
        graph.layout(["a", "b"], [("a", "b"), ("b", "a")])
    drawn = check_layout(["a", "b"], [("a", "b")])
    same = graph.layout(["a", "b"], [("a", "b"), ("a", "b"), ("a", "a"), ("a", "zz")])
    assert same.boxes == drawn.boxes and len(same.edges) == 1
    assert graph.layout([], []).boxes == {}


def test_a_random_dag_of_60_keeps_every_invariant() -> None:
    import random

    rng = random.Random(15)
    nodes = [f"n{i}" for i in range(60)]
    edges = list(
        {(nodes[i], nodes[j]) for j in range(1, 60) for i in rng.sample(range(j), min(j, 2))}
    )
    check_layout(nodes, edges)


# -- the pages ---------------------------------------------------------------------------


def state_of(b: Browser, step: str) -> Any:
    return b.script(
        "const g = document.querySelector('[data-region=graph] g[data-step=\"' + arguments[0] "
        "+ '\"]'); return g ? g.getAttribute('data-state') : null",
        step,
    )


async def wait_state(b: Browser, step: str, want: str, timeout: float = 15) -> None:
    last = None
    for _ in range(int(timeout / 0.1)):
        last = await state_of(b, step)
        if last == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"step {step!r} never showed {want!r} in the graph; last: {last!r}")


async def shown(b: Browser, css: str) -> bool:
    """Whether the element is on the page and displayed (the stylesheet hides actions)."""
    return bool(
        await b.script(
            "const e = document.querySelector(arguments[0]); return !!(e && e.offsetParent)", css
        )
    )


async def wait_shown(b: Browser, css: str, want: bool, timeout: float = 15) -> None:
    for _ in range(int(timeout / 0.1)):
        if await shown(b, css) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{css!r} never became {'shown' if want else 'hidden'}")


async def workflow_state(conn: asyncpg.Connection, schema: str, workflow_id: int) -> str:
    return str(
        await conn.fetchval(f'SELECT state FROM "{schema}".workflows WHERE id = $1', workflow_id)
    )


async def test_a_fan_in_graph_changes_colour_live_as_steps_run(
    app: taskq.App, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    @app.task
    async def fetch(shop: str) -> int:
        if shop == "slow-shop":
            await gate.wait()
        return len(shop)

    @app.task
    async def total(prices: list[int]) -> int:
        return sum(prices)

    @app.task
    async def notify(channel: str) -> None:
        return None

    async with app:
        wf = taskq.Workflow(name="prices")
        shops = ["a-shop", "b-shop", "slow-shop", "d-shop"]
        parts = [wf.add(fetch, shop=s, step_name=f"fetch-{s}") for s in shops]
        summed = wf.add(total, prices=parts)
        wf.add(notify, channel="ops", after=[summed])
        run = await wf.enqueue()
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.3)
        async with (
            app.worker(concurrency=8),
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
        ):
            await b.get(f"/workflows/{run.id}")
            await b.wait_text("#live-state", "live")
            marker = await b.script("window.marker = Math.random(); return window.marker")
            await wait_state(b, "fetch-slow-shop", "running")
            await wait_state(b, "fetch-a-shop", "succeeded")
            assert await state_of(b, "total") == "waiting"
            # The dashed after= edge and solid data edges are both drawn.
            assert await b.count("[data-region=graph] path.edge.after") == 1
            assert await b.count("[data-region=graph] path.edge:not(.after)") == 4
            assert await b.count(f"[data-region=graph] a[href$='/jobs/{run.job_ids['total']}']")
            await b.wait_text("[data-region=summary]", "running")
            await b.screenshot("workflow-fan-in-running")
            gate.set()
            await wait_state(b, "fetch-slow-shop", "succeeded")
            await wait_state(b, "notify", "succeeded")
            await b.wait_text("[data-region=summary]", "succeeded")
            await b.wait_text("[data-region=steps]", "succeeded")
            assert await b.script("return window.marker") == marker  # no reload
            assert await b.console_errors() == []
        assert await run.result(timeout=5) is None
        await dashboard.aclose()


async def test_cancel_a_running_workflow_from_its_graph(
    app: taskq.App, conn: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    @app.task(retry=NO_RETRY)
    async def step(tag: str) -> str:
        if tag == "b":
            await gate.wait()
        return tag

    async with app:
        wf = taskq.Workflow(name="to-cancel")
        a = wf.add(step, tag="a", step_name="a")
        b_ = wf.add(step, tag="b", step_name="b", after=[a])
        wf.add(step, tag="c", step_name="c", after=[b_])
        run = await wf.enqueue()
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.3)
        async with (
            app.worker(concurrency=4),
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
        ):
            await b.get(f"/workflows/{run.id}")
            await wait_state(b, "b", "running")
            assert not await shown(b, "#wf-retry")
            await b.click("#wf-cancel")
            await b.accept_alert()
            await b.wait_text(".flash", "cancelled")
            await wait_state(b, "b", "cancelled")
            assert await state_of(b, "c") == "cancelled"
            assert await state_of(b, "a") == "succeeded"
            await b.wait_text("[data-region=summary]", "cancelled")
            # The button goes away by itself once the workflow has ended.
            await wait_shown(b, "#wf-cancel", False)
            assert await b.console_errors() == []
            gate.set()
        assert await workflow_state(conn, schema, run.id) == "cancelled"
        status = await run.status()
        assert {s.name: str(s.state) for s in status.steps} == {
            "a": "succeeded",
            "b": "cancelled",
            "c": "cancelled",
        }
        await dashboard.aclose()


async def test_retry_a_failed_workflow_from_its_page(
    app: taskq.App, conn: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    calls: list[str] = []

    @app.task(retry=NO_RETRY)
    async def flaky(tag: str) -> str:
        calls.append(tag)
        if tag == "flaky" and calls.count("flaky") == 1:
            raise RuntimeError("the first call fails")
        return tag

    async with app:
        wf = taskq.Workflow(name="flaky")
        first = wf.add(flaky, tag="first", step_name="first")
        middle = wf.add(flaky, tag="flaky", step_name="middle", after=[first])
        wf.add(flaky, tag="last", step_name="last", after=[middle])
        run = await wf.enqueue()
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.3)
        async with (
            app.worker(concurrency=4),
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
        ):
            await run.wait(timeout=30)
            assert await workflow_state(conn, schema, run.id) == "failed"
            await b.get(f"/workflows/{run.id}")
            assert await state_of(b, "middle") == "failed"
            assert await state_of(b, "last") == "cancelled"
            steps = await b.text("[data-region=steps]")
            assert "RuntimeError: the first call fails" in steps
            assert "ParentFailed" in steps
            assert not await shown(b, "#wf-cancel") and await shown(b, "#wf-retry")
            await b.screenshot("workflow-failed")
            await b.click("#wf-retry")
            await b.accept_alert()
            await b.wait_text(".flash", "2 failed or cancelled steps will run again")
            await wait_state(b, "last", "succeeded")
            await b.wait_text("[data-region=summary]", "succeeded")
        assert await workflow_state(conn, schema, run.id) == "succeeded"
        assert calls == ["first", "flaky", "flaky", "last"]
        await dashboard.aclose()


async def test_a_map_of_500_items_is_one_box_with_counts(app: taskq.App, tmp_path: Path) -> None:
    gate = asyncio.Event()

    @app.task
    async def split(n: int) -> list[int]:
        return list(range(n))

    @app.task
    async def resize(photo: int) -> int:
        if photo >= 490:
            await gate.wait()
        return photo

    @app.task
    async def reduce(sizes: list[int]) -> int:
        return sum(sizes)

    async with app:
        wf = taskq.Workflow(name="thumbnails")
        photos = wf.add(split, n=500)
        sizes = wf.map(resize, over=photos, arg="photo")
        wf.add(reduce, sizes=sizes)
        run = await wf.enqueue()
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.3)
        async with (
            app.worker(concurrency=12),  # 10 items block; 2 slots for the rest
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
        ):
            await b.get(f"/workflows/{run.id}")
            await wait_state(b, "resize", "running")
            await b.wait_text(
                "[data-region=graph] g[data-step=resize]",
                lambda t: "490 succeeded" in t and "10 running" in t,
                timeout=60,
            )
            box = await b.text("[data-region=graph] g[data-step=resize]")
            assert "resize[0..499]" in box
            # Three boxes, two edges: the items are folded into their map.
            assert await b.count("[data-region=graph] g.node") == 3
            assert await b.count("[data-region=graph] path.edge") == 2
            table = await b.text("[data-region=steps]")
            assert "more of resize: 490 succeeded" in table and "resize[495]" in table
            await b.screenshot("workflow-map-reduce-running")
            gate.set()
            await wait_state(b, "reduce", "succeeded", timeout=30)
            await wait_state(b, "resize", "succeeded")
            await b.wait_text("[data-region=graph] g[data-step=resize]", "500 succeeded")
        assert await run.result(timeout=5) == sum(range(500))
        await dashboard.aclose()


async def test_many_alike_steps_are_one_box(app: taskq.App, tmp_path: Path) -> None:
    @app.task
    async def split() -> int:
        return 1

    @app.task
    async def fetch(url: str, n: int) -> int:
        return n

    @app.task
    async def probe(url: str, n: int) -> int:
        return n

    @app.task
    async def join(parts: list[int]) -> int:
        return sum(parts)

    async with app:
        wf = taskq.Workflow(name="crawl")
        root = wf.add(split)
        few = [wf.add(probe, url=f"few{i}", n=root) for i in range(12)]
        many = [wf.add(fetch, url=f"u{i}", n=root) for i in range(60)]
        wf.add(join, parts=many + few)
        run = await wf.enqueue()  # no worker: split queued, the rest waiting
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get(f"/workflows/{run.id}")
            assert r.status_code == 200
            # split, the 12 probes one by one (too few to fold), the 60 fetches in
            # one box, join.
            assert r.text.count('<g class="node') == 15
            assert r.text.count('<path class="edge') == 12 + 12 + 1 + 1
            assert 'data-step="fetch … fetch-60"' in r.text
            assert "60 waiting" in r.text and "60 alike steps" in r.text
            assert "… and 30 more of fetch … fetch-60: 30 waiting" in r.text
            async with browser(url, tmp_path / "shots") as b:
                await b.get(f"/workflows/{run.id}")
                await b.screenshot("workflow-fan-out-folded")
                assert await b.console_errors() == []
        await dashboard.aclose()


async def test_the_list_pages_filters_and_shows_counts(
    app: taskq.App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task(retry=NO_RETRY)
    async def work(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n

    async with app:
        runs = []
        for i in range(5):
            wf = taskq.Workflow(name=f"batch-{i % 2}")
            first = wf.add(work, n=i)
            wf.add(work, n=-1 if i == 3 else i, after=[first])
            runs.append(await wf.enqueue())
        async with app.worker(concurrency=4):
            for r in runs:
                await r.wait(timeout=30)
        wf = taskq.Workflow(name="pending")
        wf.add(work, n=1)
        waiting = await wf.enqueue()  # no worker now: stays running, 1 queued
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.get("/workflows")
                assert r.status_code == 200
                ids = [int(x) for x in re.findall(r'data-workflow="(\d+)"', r.text)]
                assert ids == [waiting.id] + [x.id for x in reversed(runs)]
                r = await client.get("/workflows?state=failed")
                assert re.findall(r'data-workflow="(\d+)"', r.text) == [str(runs[3].id)]
                assert "1 failed" in r.text and "1 succeeded" in r.text
                r = await client.get("/workflows?name=batch-1")
                assert len(re.findall(r'data-workflow="(\d+)"', r.text)) == 2
                r = await client.get("/workflows?state=nope")
                assert r.status_code == 400
                monkeypatch.setattr(workflows_page, "PAGE_SIZE", 2)
                seen: list[int] = []
                page = "/workflows"
                while True:
                    r = await client.get(page)
                    seen += [int(x) for x in re.findall(r'data-workflow="(\d+)"', r.text)]
                    older = re.search(r'href="(\?[^"]*before=\d+)" rel="next"', r.text)
                    if older is None:
                        break
                    page = "/workflows" + older[1].replace("&amp;", "&")
                assert seen == ids
                for missing in ("/workflows/987654", "/workflows/99999999999999999999999"):
                    r = await client.get(missing)
                    assert r.status_code == 404 and "no workflow" in r.text.lower()
            monkeypatch.undo()
            async with browser(url, tmp_path / "shots") as b:
                await b.get("/workflows")
                text = await b.text("[data-region=list]")
                assert "pending" in text and "failed" in text
                await b.screenshot("workflows-list")
                assert await b.console_errors() == []
        await dashboard.aclose()


async def test_names_and_errors_are_text_and_read_only_has_no_button(
    app: taskq.App, tmp_path: Path
) -> None:
    @app.task(retry=NO_RETRY)
    async def bad(x: int) -> None:
        raise ValueError(f"broken {SCRIPT}")

    async with app:
        wf = taskq.Workflow(name=f"wf {SCRIPT}")
        wf.add(bad, x=1, step_name=f"step {SCRIPT}")
        run = await wf.enqueue()
        async with app.worker(concurrency=2):
            await run.wait(timeout=30)
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                for path in ("/workflows", f"/workflows/{run.id}"):
                    r = await client.get(path)
                    assert r.status_code == 200
                    assert SCRIPT not in r.text
                    assert "&lt;script&gt;" in r.text
            async with browser(url, tmp_path / "shots") as b:
                await b.get(f"/workflows/{run.id}")
                assert SCRIPT in await b.text("[data-region=steps]")
                assert await b.script("return document.title") != "pwned"
                assert await shown(b, "#wf-retry")
        await dashboard.aclose()

        read_only = Dashboard(app, auth=no_auth, read_only=True)
        async with serve(read_only) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get(f"/workflows/{run.id}")
            assert r.status_code == 200
            assert "<form" not in r.text and "wf-retry" not in r.text
            r = await client.get("/workflows")
            assert "<form" not in r.text.replace('<form class="filters"', "")
            r = await client.post(f"/workflows/{run.id}/retry", data={"csrf_token": "x"})
            assert r.status_code == 403
        assert (await run.status(steps=False)).state is taskq.WorkflowState.FAILED
        await read_only.aclose()


async def test_actions_on_an_ended_or_missing_workflow_say_so(app: taskq.App) -> None:
    @app.task
    async def ok() -> int:
        return 1

    async with app:
        wf = taskq.Workflow(name="done")
        wf.add(ok)
        run = await wf.enqueue()
        async with app.worker(concurrency=1):
            await run.wait(timeout=30)
        wf = taskq.Workflow(name="pending")
        wf.add(ok)
        pending = await wf.enqueue()  # no worker now: its page has the cancel form
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            token = await csrf_form(client, f"/workflows/{pending.id}")
            r = await client.post(f"/workflows/{run.id}/cancel", data=token)
            assert r.status_code == 303 and r.headers["location"] == f"/workflows/{run.id}"
            r = await client.get(r.headers["location"])
            assert "had already ended" in r.text
            r = await client.post(f"/workflows/{run.id}/retry", data=token)
            r = await client.get(r.headers["location"])
            assert "no failed or cancelled step" in r.text
            r = await client.post("/workflows/987654/cancel", data=token)
            assert r.status_code == 404
        await dashboard.aclose()
