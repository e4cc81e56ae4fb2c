"""`treespec serve --data-parallel-size K`: K engines behind the one OpenAI endpoint, as a Ray Serve application.

The HTTP side is the single-process server's own app (server/app.py): it runs in the `treespec serve` process
and sees the replicas through a ReplicaPool, an EngineClient like AsyncEngine. Each replica is a Ray Serve
deployment replica holding an LLM and its AsyncEngine (replica.py); deltas stream back through deployment
handles. cluster.py starts or joins the Ray cluster, deploys, and tears everything down on exit.
"""
