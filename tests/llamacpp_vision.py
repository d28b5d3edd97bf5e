"""llama.cpp's own image encoder (an mmproj file through llama-cpp-python's mtmd bindings), which the
app never uses (it encodes images in PyTorch): the tests compare the exported mmproj with PyTorch."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from PIL import Image

from inference.backends.llamacpp import LlamaCpp


class LlamaCppVision:
    """llama.cpp's own image encoder (`mmproj` file, through llama-cpp-python's mtmd bindings): an RGB
    image → the projected embeddings its multimodal runtime feeds the language model."""

    def __init__(self, mmproj: Path, language_model: LlamaCpp, threads: int) -> None:
        from llama_cpp import mtmd_cpp

        self.mtmd = mtmd_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, threads, False
        self.context = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), language_model.model, params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not load {mmproj}")
        self.width = language_model.width

    def __del__(self) -> None:
        if getattr(self, "context", None):
            self.mtmd.mtmd_free(self.context)

    def encode(self, image: Image.Image) -> np.ndarray:
        """(image positions, width) float32: the rows llama.cpp decodes in place of the image."""
        mtmd = self.mtmd
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        data = pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, data)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.context, chunks, ctypes.byref(text), bitmaps, 1):
                raise RuntimeError("llama.cpp could not tokenize the image")
            chunk = next(
                mtmd.mtmd_input_chunks_get(chunks, index)
                for index in range(mtmd.mtmd_input_chunks_size(chunks))
                if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, index))
                == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
            )
            if mtmd.mtmd_encode_chunk(self.context, chunk):
                raise RuntimeError("llama.cpp could not encode the image")
            rows = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            pointer = mtmd.mtmd_get_output_embd(self.context)
            return np.ctypeslib.as_array(pointer, shape=(rows * self.width,)).reshape(rows, self.width).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
