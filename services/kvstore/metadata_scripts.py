"""The Lua scripts behind MetadataStore (services/kvstore/metadata.py).

Each keeps the metadata invariant atomically: a block entry names node n exactly when its hash is
in n's owned set. Key names are built from ARGV (a standalone Redis, not Redis Cluster).
"""

# Shared by register, deregister and sweep: drop every entry a node id owns.
LUA_WITHDRAW_ALL = """
local function withdraw_all(prefix, node_id)
  local owned = prefix .. ':owned:' .. node_id
  for _, hex in ipairs(redis.call('SMEMBERS', owned)) do
    local block = prefix .. ':block:' .. hex
    if redis.call('HGET', block, 'node') == node_id then redis.call('DEL', block) end
  end
  redis.call('DEL', owned)
end
"""

# ARGV: prefix, node_id, incarnation, grpc_address, data_address, data_transport, ttl_ms,
# takeover ('1': replace any incarnation, as a starting process does) -> 1, or 0 if refused
LUA_REGISTER = (
    LUA_WITHDRAW_ALL
    + """
local prefix, node_id = ARGV[1], ARGV[2]
local node = prefix .. ':node:' .. node_id
local incarnation = redis.call('HGET', node, 'incarnation')
if ARGV[8] ~= '1' and incarnation and incarnation ~= ARGV[3] then return 0 end
withdraw_all(prefix, node_id)
redis.call('DEL', node)
redis.call('HSET', node, 'incarnation', ARGV[3], 'grpc_address', ARGV[4],
           'data_address', ARGV[5], 'data_transport', ARGV[6])
redis.call('PEXPIRE', node, ARGV[7])
redis.call('SADD', prefix .. ':nodes', node_id)
return 1
"""
)

# ARGV: prefix, node_id, incarnation, ttl_ms -> 1 alive, 0 missing, -1 superseded
LUA_HEARTBEAT = """
local node = ARGV[1] .. ':node:' .. ARGV[2]
local incarnation = redis.call('HGET', node, 'incarnation')
if not incarnation then return 0 end
if incarnation ~= ARGV[3] then return -1 end
redis.call('PEXPIRE', node, ARGV[4])
return 1
"""

# ARGV: prefix, node_id, incarnation. A newer incarnation's registration is left alone.
LUA_DEREGISTER = (
    LUA_WITHDRAW_ALL
    + """
local prefix, node_id = ARGV[1], ARGV[2]
local node = prefix .. ':node:' .. node_id
local incarnation = redis.call('HGET', node, 'incarnation')
if incarnation and incarnation ~= ARGV[3] then return 0 end
withdraw_all(prefix, node_id)
redis.call('DEL', node)
redis.call('SREM', prefix .. ':nodes', node_id)
return 1
"""
)

# ARGV: prefix, node_id, incarnation, now, then (hex, size, layers) per block -> the hexes
# refused: blocks another live node (its node key present) already owns. The first live copy
# stays the one indexed; the announcer drops its own (a copy nobody can look up only costs it
# capacity). An entry of a node whose key lapsed is taken over.
LUA_ANNOUNCE = """
local prefix, node_id = ARGV[1], ARGV[2]
if redis.call('HGET', prefix .. ':node:' .. node_id, 'incarnation') ~= ARGV[3] then
  return redis.error_reply('NOTREGISTERED node ' .. node_id)
end
local owned = prefix .. ':owned:' .. node_id
local refused = {}
for i = 5, #ARGV, 3 do
  local hex = ARGV[i]
  local block = prefix .. ':block:' .. hex
  local old = redis.call('HGET', block, 'node')
  if old and old ~= node_id and redis.call('EXISTS', prefix .. ':node:' .. old) == 1 then
    refused[#refused + 1] = hex
  else
    if old and old ~= node_id then redis.call('SREM', prefix .. ':owned:' .. old, hex) end
    redis.call('HSET', block, 'node', node_id, 'size', ARGV[i + 1], 'layers', ARGV[i + 2],
               'last_use', ARGV[4])
    redis.call('SADD', owned, hex)
  end
end
return refused
"""

# ARGV: prefix, node_id, incarnation, hex... -> entries removed
LUA_WITHDRAW = """
local prefix, node_id = ARGV[1], ARGV[2]
local incarnation = redis.call('HGET', prefix .. ':node:' .. node_id, 'incarnation')
if incarnation and incarnation ~= ARGV[3] then return 0 end
local owned = prefix .. ':owned:' .. node_id
local removed = 0
for i = 4, #ARGV do
  local block = prefix .. ':block:' .. ARGV[i]
  if redis.call('HGET', block, 'node') == node_id then
    redis.call('DEL', block)
    removed = removed + 1
  end
  redis.call('SREM', owned, ARGV[i])
end
return removed
"""

# ARGV: prefix, now, hex... -> entries touched (missing ones are not created)
LUA_TOUCH = """
local touched = 0
for i = 3, #ARGV do
  local block = ARGV[1] .. ':block:' .. ARGV[i]
  if redis.call('EXISTS', block) == 1 then
    redis.call('HSET', block, 'last_use', ARGV[2])
    touched = touched + 1
  end
end
return touched
"""

# Shared by longest-prefix and lookup: ARGV[first..] are hex hashes of a chain -> {node_id,
# data_address, data_transport, size, layers} per hit, stopping at the first block with no entry
# or whose node key is gone.
LUA_LONGEST_PREFIX_FN = """
local function longest_prefix(prefix, first)
  local nodes = {}
  local hits = {}
  for i = first, #ARGV do
    local entry = redis.call('HMGET', prefix .. ':block:' .. ARGV[i], 'node', 'size', 'layers')
    local node_id = entry[1]
    if not node_id then break end
    local node = nodes[node_id]
    if node == nil then
      node = redis.call('HMGET', prefix .. ':node:' .. node_id, 'data_address', 'data_transport')
      if not node[1] then node = false end
      nodes[node_id] = node
    end
    if not node then break end
    hits[#hits + 1] = {node_id, node[1], node[2], entry[2], entry[3]}
  end
  return hits
end
"""

# ARGV: prefix, hex... -> longest_prefix's hits
LUA_LONGEST_PREFIX = LUA_LONGEST_PREFIX_FN + "return longest_prefix(ARGV[1], 2)\n"

# A prefill worker's lookup: the hits, and how many blocks of the chain from the first were held
# or seen by an earlier lookup (MetadataStore.lookup: which blocks are reused, worth writing).
# "Seen" is an aging Bloom filter: a bitmap per generation of the seen window, 3 bits a hash
# taken from the hash itself; a hash is seen when all its bits are set in this generation's
# bitmap or the previous one. Every hash of the chain is marked in this generation's.
# One call takes one chunk of the chain (MetadataStore.lookup): whether the chain's hits and its
# seen run still go on at the chunk's first hash ('1') or ended in an earlier chunk ('0').
# ARGV: prefix, generation, bitmap ttl_ms, bits per bitmap, hitting, seeing, hex...
#   -> {hits, num_seen}
LUA_LOOKUP = (
    LUA_LONGEST_PREFIX_FN
    + """
local prefix, generation, bits = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local hitting, seeing = ARGV[5] == '1', ARGV[6] == '1'
local hits = {}
if hitting then hits = longest_prefix(prefix, 7) end
local current = prefix .. ':seen:' .. generation
local previous = prefix .. ':seen:' .. (generation - 1)
local function all_set(key, positions)
  for _, p in ipairs(positions) do
    if redis.call('GETBIT', key, p) == 0 then return false end
  end
  return true
end
local seen, run = #hits, seeing
for i = 7, #ARGV do
  local hex = ARGV[i]
  local positions = {}
  for j = 0, 2 do positions[j + 1] = tonumber(string.sub(hex, 8 * j + 1, 8 * j + 8), 16) % bits end
  if run and i - 6 > #hits then
    if all_set(current, positions) or all_set(previous, positions) then
      seen = seen + 1
    else
      run = false
    end
  end
  for _, p in ipairs(positions) do redis.call('SETBIT', current, p, 1) end
end
if #ARGV >= 7 then redis.call('PEXPIRE', current, ARGV[3]) end
return {hits, seen}
"""
)

# ARGV: prefix -> number of dead nodes whose entries were deleted
LUA_SWEEP = (
    LUA_WITHDRAW_ALL
    + """
local prefix = ARGV[1]
local swept = 0
for _, node_id in ipairs(redis.call('SMEMBERS', prefix .. ':nodes')) do
  if redis.call('EXISTS', prefix .. ':node:' .. node_id) == 0 then
    withdraw_all(prefix, node_id)
    redis.call('SREM', prefix .. ':nodes', node_id)
    swept = swept + 1
  end
end
return swept
"""
)
