"""Forwards a Unix socket to 127.0.0.1:PORT: the only way into a local TFF worker that runs in a private network
namespace (``federated/workers.py``). Run inside that namespace as a plain script (no package imports):

    python federated/unix_forward.py SOCKET_PATH PORT

The socket's directory is private to the user (0700), so only this user's processes can connect; TFF's
``worker_binary`` itself listens on every interface of the namespace, which has only its own loopback."""
import asyncio
import os
import sys


async def _pipe(reader, writer):
    try:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001
            pass


async def _main(path: str, port: int) -> None:
    async def handle(client_reader, client_writer):
        try:
            worker_reader, worker_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            client_writer.close()  # the worker is gone: the client sees the connection closed (UNAVAILABLE)
            return
        await asyncio.gather(_pipe(client_reader, worker_writer), _pipe(worker_reader, client_writer))

    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, 0o600)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(_main(sys.argv[1], int(sys.argv[2])))
    except KeyboardInterrupt:
        pass
