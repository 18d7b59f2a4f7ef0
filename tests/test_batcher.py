"""serve.batcher: batches form when the model is free, from everything queued meanwhile."""

import asyncio

import pytest

from serve.batcher import Batcher


def run(coro):
    return asyncio.run(coro)


def test_requests_queued_during_a_forward_make_the_next_batch_whole():
    """32 callers at once against a forward slower than the wait: Serve 2.60's @serve.batch gave batches
    of 1-5 here (formed every timeout, queued behind the running one); these fill up to the maximum."""
    sizes = []

    async def forward(items):
        sizes.append(len(items))
        await asyncio.sleep(0.02)
        return [i * 10 for i in items]

    async def main():
        b = Batcher(forward, max_batch_size=8, wait_s=0.001)
        return await asyncio.gather(*(b.submit(i) for i in range(32)))

    assert run(main()) == [i * 10 for i in range(32)]  # each caller gets its own item's result
    assert sum(sizes) == 32 and max(sizes) == 8
    assert sizes[1:] == [8] * ((32 - sizes[0]) // 8) + ([(32 - sizes[0]) % 8] if (32 - sizes[0]) % 8 else [])


def test_an_idle_model_waits_for_company_only_up_to_wait_s():
    sizes = []

    async def forward(items):
        sizes.append(len(items))
        return items

    async def main():
        b = Batcher(forward, max_batch_size=16, wait_s=0.05)
        first = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.01)
        second = await b.submit("b")  # joins the first within its wait
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        alone = await b.submit("c")  # nobody joins: runs after wait_s, not later
        return await first, second, alone, loop.time() - t0

    first, second, alone, waited = run(main())
    assert (first, second, alone) == ("a", "b", "c") and sizes == [2, 1]
    assert 0.04 < waited < 0.5


def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs():
    calls = []

    async def forward(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("forward failed")
        return items

    async def main():
        b = Batcher(forward, max_batch_size=4, wait_s=0.0)
        with pytest.raises(RuntimeError, match="forward failed"):
            await b.submit("bad")
        return await b.submit("good")

    assert run(main()) == "good" and calls == [["bad"], ["good"]]


def test_a_caller_that_left_is_not_scored():
    seen = []

    async def forward(items):
        seen.extend(items)
        await asyncio.sleep(0.02)
        return items

    async def main():
        b = Batcher(forward, max_batch_size=4, wait_s=0.0)
        busy = asyncio.create_task(b.submit("first"))
        await asyncio.sleep(0.005)  # the model is now busy with "first"
        left = asyncio.create_task(b.submit("left"))
        await asyncio.sleep(0.001)
        left.cancel()
        stays = await b.submit("stays")
        return await busy, stays

    assert run(main()) == ("first", "stays") and "left" not in seen
