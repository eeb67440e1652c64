"""The release-morning demo (``haoyuan demo``): ``run.run_demo`` starts what
it needs, imports the demo hospital (``hospital``), runs the crowd over HTTP
(``http``, Locust) or in process, and writes the report (``report``)."""

from benchmarks.demo.run import run_demo

__all__ = ["run_demo"]
