"""Build steps, one module per step; `builder.pipeline` calls them in a fixed order.

Each step is a plain function of a `builder.pipeline.BuildContext` that writes only inside `ctx.workdir` and
imports its heavy libraries (torch, transformers, bitsandbytes, onnxruntime) inside the function.
"""
