"""Faces of other frameworks' APIs over fedstream's own objects, so their code ports by changing imports.

`nvflare` mirrors the file-transfer API of NVIDIA FLARE 2.7–2.9 (ObjectDownloader, add_file,
FileStreamer with NVFlare's callback signatures, StreamContextKey, ReturnCode).
"""
