// The peer the real-time benchmark compares ChatStream's brokers with (docs/adr/0020, the probe): a Socket.IO 4 server
// with @socket.io/redis-streams-adapter on the same Redis, doing the same job per message: take a message
// from a member of a room, ack it, and push it to every member of the room (the sender's own socket too).
//
//   node bench/peer/server.js --port 9001 --redis redis://127.0.0.1:6379/0
//
// A client connects to /socket.io/ (websocket transport) with auth {user, rooms: [...]}, emits
// "send" {conversation_id, client_msg_id, content} with an ack, and receives "message" events.
"use strict";

const { createServer } = require("http");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-streams-adapter");

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

async function main() {
  const port = Number(arg("port", "9001"));
  const redisUrl = arg("redis", "redis://127.0.0.1:6379/0");
  const redisClient = createClient({ url: redisUrl });
  redisClient.on("error", (err) => console.error("redis error", err));
  await redisClient.connect();

  const httpServer = createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(redisClient, { streamName: "bench:socket.io" }),
    transports: ["websocket"],
    maxHttpBufferSize: 64 * 1024, // the same 64 KiB frame limit as ChatStream
  });
  let seq = 0;
  io.on("connection", (socket) => {
    const auth = socket.handshake.auth || {};
    socket.data.user = String(auth.user || "");
    for (const room of auth.rooms || []) socket.join(String(room));
    socket.on("send", (msg, ack) => {
      if (!msg || typeof msg.conversation_id !== "string" || !socket.rooms.has(msg.conversation_id)) {
        if (typeof ack === "function") ack({ error: "not_found" });
        return;
      }
      seq += 1;
      const message = {
        id: `${process.pid}-${seq}`, conversation_id: msg.conversation_id, sender_id: socket.data.user,
        content: msg.content, client_msg_id: msg.client_msg_id, timestamp: new Date().toISOString(),
      };
      io.to(msg.conversation_id).emit("message", message);
      if (typeof ack === "function") ack({ message_id: message.id, client_msg_id: msg.client_msg_id });
    });
  });
  httpServer.listen(port, "127.0.0.1", () => console.log(`peer listening on ${port} pid ${process.pid}`));
  const stop = () => { io.close(); redisClient.quit().finally(() => process.exit(0)); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => { console.error(err); process.exit(1); });
