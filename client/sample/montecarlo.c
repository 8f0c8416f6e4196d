/* Monte Carlo estimate of pi, split across replicas like an array job.
 * Each replica reads CLOUD_REPLICA / CLOUD_REPLICAS from its environment,
 * draws its own share of the samples with its own seed, and prints its
 * partial count; adding the counts of all replicas gives the estimate. */
#include <stdio.h>
#include <stdlib.h>

static unsigned long long next(unsigned long long *s) {
    /* xorshift64*: small, fast, reproducible for a given seed */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static long env_or(const char *name, long fallback) {
    const char *v = getenv(name);
    return v ? strtol(v, NULL, 10) : fallback;
}

int main(void) {
    long replica = env_or("CLOUD_REPLICA", 0);
    long replicas = env_or("CLOUD_REPLICAS", 1);
    long ticket = env_or("CLOUD_TICKET", 0);
    long total = 4000000;
    long share = total / replicas + (replica < total % replicas ? 1 : 0);
    unsigned long long seed = 0x9E3779B97F4A7C15ULL * (unsigned long long)(replica + 1);
    long inside = 0;
    for (long i = 0; i < share; i++) {
        double x = (next(&seed) >> 11) * (1.0 / 9007199254740992.0);
        double y = (next(&seed) >> 11) * (1.0 / 9007199254740992.0);
        if (x * x + y * y <= 1.0)
            inside++;
    }
    printf("ticket %ld replica %ld of %ld (node port %s)\n", ticket, replica, replicas,
           getenv("CLOUD_NODE_PORT") ? getenv("CLOUD_NODE_PORT") : "?");
    printf("samples %ld inside %ld\n", share, inside);
    printf("partial pi estimate %.6f\n", 4.0 * inside / share);
    return 0;
}
