"""
Router processes: C{workers = N} runs N of them on shared listeners,
supervised by twistd's process (L{pool}), steered by client address
(L{sockets}); L{worker} is the program each one runs.
"""
