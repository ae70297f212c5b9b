"""Inference, one file per Ray role: generate.py (`generate`: the ray.data.llm processor, and the dispatch to the
other two), actor_pool.py (Ray Data actors owning an in-process vLLM engine), client.py (a served model's client: the
shared teacher, HTTP generation), deploy.py (the ray.serve.llm deployment), requests.py (prompts and scores every path
shares) and engine.py (vLLM settings and the version-fragile calls)."""
