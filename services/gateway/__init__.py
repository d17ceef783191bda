"""The public gateway: title resolution, MyAnimeList list import, and (later) the gRPC server."""
