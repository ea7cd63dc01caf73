"""The ``edgeloop`` command line: the composition root that ties the packages together.

It is the only place allowed to import server, training and edge_agent side by side.
"""

__version__ = "0.1.0"
