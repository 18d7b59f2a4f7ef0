"""Request batching for the model replica: a batch is formed when the model is free to run it.

Serve 2.60's `@serve.batch` forms a batch every `batch_wait_timeout_s` whether or not the previous one
still runs, and queues the formed batches behind it. With a forward longer than the timeout (the tiny
model's, with its adapters, takes 15 ms for one image and 5 ms per image in a batch of 16), 32 clients
got batches of 1-5 images and waited ~0.5 s for their turn (measured with `bench/peers.py --parts
batching`). Here requests wait in one queue, and when the forward before returns the next batch takes
everything queued then, up to `max_batch_size`; only a model that sat idle waits `wait_s` for company.
"""

import asyncio
from typing import Awaitable, Callable


class Batcher:
    """`await submit(item)` -> `fn`'s result for that item; `fn(items)` runs one batch at a time."""

    def __init__(self, fn: Callable[[list], Awaitable[list]], max_batch_size: int, wait_s: float):
        self.fn, self.max_batch_size, self.wait_s = fn, max(1, max_batch_size), wait_s
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.idle = True  # no forward ran since the queue last emptied

    async def submit(self, item):
        if self.worker is None or self.worker.done():  # the replica's own loop, created lazily within it
            self.queue = self.queue or asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _next_batch(self) -> list:
        batch = []
        self.idle = self.idle or self.queue.empty()
        if self.idle:  # nobody was waiting for the model: give others a moment to join the first
            batch.append(await self.queue.get())
            self.idle = False
            deadline = asyncio.get_running_loop().time() + self.wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        while len(batch) < self.max_batch_size and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return [(item, f) for item, f in batch if not f.done()]  # a caller that left is not scored

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            items, futures = zip(*batch)
            try:
                results = await self.fn(list(items))
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error; the loop lives on
                for f in futures:
                    if not f.done():
                        f.set_exception(e)
                continue
            for f, result in zip(futures, results):
                if not f.done():
                    f.set_result(result)
