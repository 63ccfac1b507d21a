"""The Lua scripts that make Redis lanes atomic: each runs whole on the Redis server, so
entering, releasing, checking and renewing a lane never interleave across replicas. The
keys they use are laid out in `redis.py`'s docstring."""

# grant_next(queue, holder, fence_key, note_key, prefix, lease_ms, now_ms): give the lane
# to the oldest waiting ticket whose replica is alive, with the hand-off note, and tell
# that replica. Every grant takes the note, so a lane whose holder crashed passes none on.
GRANT_NEXT = """
-- Fences follow the Redis server's clock in microseconds when the counter lags it, so
-- they keep growing even after a restart of a Redis that persists nothing.
local function next_fence(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local fence = redis.call('INCR', key)
  if fence < now then
    redis.call('SET', key, now)
    fence = now
  end
  return fence
end
local function take_note(key)
  local note = redis.call('GET', key)
  if not note then return '' end
  redis.call('DEL', key)
  return note
end
local function grant_next(queue, holder, fence_key, note_key, prefix, lease, now)
  while true do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then return false end
    redis.call('ZREM', queue, head)
    local replica = string.match(head, '^([^:]+):')
    if redis.call('EXISTS', prefix .. 'alive:' .. replica) == 1 then
      local fence = next_fence(fence_key)
      local f = string.format('%d', fence)
      local note = take_note(note_key)
      redis.call('SET', holder, head .. '|' .. f .. '|' .. now, 'PX', lease)
      redis.call('PUBLISH', prefix .. 'r:' .. replica, 'grant|' .. head .. '|' .. f .. '|' .. note)
      return head, f, note
    end
  end
end
local function holds(holder, ticket)
  return holder and string.sub(holder, 1, #ticket + 1) == ticket .. '|'
end
"""

# KEYS: queue, holder, seq, fence, note. ARGV: replica, owner, max_waiting, lease_ms,
# now_ms, queue_ttl_ms, prefix. Returns {ticket, position (-1: no room), fence or waiting,
# note}.
ENTER = GRANT_NEXT + """
local seq = redis.call('INCR', KEYS[3])
local ticket = ARGV[1] .. ':' .. seq .. ':' .. ARGV[5] .. ':' .. ARGV[2]
local holder = redis.call('GET', KEYS[2])
if not holder and redis.call('ZCARD', KEYS[1]) > 0 then
  -- the holder's lease ran out (crashed replica) while tickets waited: they go first
  grant_next(KEYS[1], KEYS[2], KEYS[4], KEYS[5], ARGV[7], ARGV[4], ARGV[5])
  holder = redis.call('GET', KEYS[2])
end
if not holder then
  local fence = next_fence(KEYS[4])
  redis.call('SET', KEYS[2], ticket .. '|' .. string.format('%d', fence) .. '|' .. ARGV[5],
             'PX', ARGV[4])
  return {ticket, 0, fence, take_note(KEYS[5])}
end
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[3]) then return {'', -1, waiting, ''} end
redis.call('ZADD', KEYS[1], seq, ticket)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {ticket, waiting + 1, 0, ''}
"""

# KEYS: queue, holder, fence, note. ARGV: ticket, lease_ms, now_ms, prefix, note,
# note_ttl_ms. Frees the lane if the ticket holds it, leaving its note (if not empty) for
# the next grant, else takes the ticket out of the queue. Returns {ticket, fence, note} of
# a grant it made (the releasing replica may hold that ticket: it grants it at once instead
# of waiting for its own notification), else {}.
RELEASE = GRANT_NEXT + """
local holder = redis.call('GET', KEYS[2])
if holds(holder, ARGV[1]) then
  redis.call('DEL', KEYS[2])
  if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[6]) end
  local head, fence, note = grant_next(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[4], ARGV[2],
                                       ARGV[3])
  if head then return {head, fence, note} end
  return {}
end
redis.call('ZREM', KEYS[1], ARGV[1])
if not holder and redis.call('ZCARD', KEYS[1]) > 0 then
  local head, fence, note = grant_next(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[4], ARGV[2],
                                       ARGV[3])
  if head then return {head, fence, note} end
end
return {}
"""

# KEYS: queue, holder, fence, note. ARGV: ticket, lease_ms, now_ms, prefix.
# A waiter's safety net: {1, fence, note} if it holds the lane (granting it if the lane is
# free and it is next; the note only then, as a grant made elsewhere sent it already),
# {0, tickets ahead} if it waits, {-1} if it was dropped.
CHECK = GRANT_NEXT + """
local holder = redis.call('GET', KEYS[2])
if not holder and redis.call('ZCARD', KEYS[1]) > 0 then
  local head, fence, note = grant_next(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[4], ARGV[2],
                                       ARGV[3])
  if head == ARGV[1] then return {1, tonumber(fence), note} end
  holder = redis.call('GET', KEYS[2])
end
if holds(holder, ARGV[1]) then
  return {1, tonumber(string.match(holder, '|(%d+)|')), ''}
end
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if not rank then return {-1, 0} end
if holder then rank = rank + 1 end
return {0, rank}
"""

# KEYS: holder. ARGV: ticket, lease_ms. 1 if renewed, 0 if the lane is no longer held.
RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


# KEYS: claim. ARGV: replica|turn_id, ttl_ms, prefix. Returns the other live claimant's
# turn id, or nil once the claim is ours (a dead replica's claim is taken over).
CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  local replica, turn = string.match(current, '^([^|]+)|(.*)$')
  if redis.call('EXISTS', ARGV[3] .. 'alive:' .. replica) == 1 then return turn end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS: claim. ARGV: replica|turn_id. Deletes the claim only if it is still this one.
UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
