"""vtc.demo: the Gradio web demo (``vtc demo``) -- see which visual tokens a compressor keeps, for images and videos.

``engine`` (uploads, model cache and locks, requests) and ``render`` (PIL drawing) need no Gradio; ``app`` does.
"""
