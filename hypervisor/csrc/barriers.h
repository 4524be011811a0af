/* Memory ordering for memory shared with another domain, one spelling for every C module
 * (a header only: nothing of it is exposed to Python). */
#ifndef RF_BARRIERS_H
#define RF_BARRIERS_H

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_ONCE(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FULL_BARRIER() __atomic_thread_fence(__ATOMIC_SEQ_CST)

#endif
