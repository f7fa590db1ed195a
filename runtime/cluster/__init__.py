"""``adasr cluster``: ``adasr run`` over a Ray cluster (the ``ray`` extra; imported lazily).

- :mod:`runtime.cluster.job` -- the driver: cut inputs into chunks, dispatch them to actors,
  collect, join (fault handling and the atomic output rule are described there);
- :mod:`runtime.cluster.worker` -- the dispatcher actor and the chunk records;
- :mod:`runtime.cluster.join` -- chunk segments -> one video with the input's audio;
- :mod:`runtime.cluster.progress` -- progress reported by the workers, read by the driver.

**Hysteresis across chunk boundaries.** A video's dispatcher carries per-tile state from frame
to frame (the previous image offset, and the previous rung under the budget policy). Decision:
the state is carried *exactly*. The driver decodes every frame anyway (to cut the chunks), so it
also runs the statistic and the hysteresis rule on each frame (:meth:`Dispatcher.observe`: the
same code as :meth:`Dispatcher.upscale` without the engines, a few percent of its time) and
hands each chunk the state before its first frame; the worker :meth:`Dispatcher.restore`\\ s it.
Every chunk therefore chooses the engine of every tile as one process running the whole clip
does, so the frames are identical to ``adasr run`` with the same bundle, policy and
hysteresis, at any chunk size and worker count: nothing resets at chunk starts and the
single-process run is unchanged. (Re-warming each chunk from an overlap of K frames would be
exact only when every tile's ``g`` leaves the hysteresis band within K frames; cutting at scene
cuts would tie the chunk size to the content.)
"""
