// The key the agent of epoch `writer_epoch` writes with where the owner published `base` (AgentInfo::peer_keys): a
// 64-bit mix of both, never 0 ("not registered"), so each writer's keys are its own and a new incarnation's differ.
// Header-only: the UCX plugin derives them too, to check a write's keys before it leaves.
#pragma once
#include <cstdint>

namespace kvxfer {

inline uint64_t peer_key(uint64_t base, uint64_t writer_epoch) {
  uint64_t z = base ^ (writer_epoch * 0x9e3779b97f4a7c15ull);  // splitmix64's finalizer over both
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z ? z : 1;
}

}  // namespace kvxfer
