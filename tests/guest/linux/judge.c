/*
 * The judge of luvmm's Linux microVM guest: what the guest itself saw across a pause, a save or
 * a live update of the host kernel.
 *
 * It fills a share of RAM with seeded words, keeps checksummed blocks going to and from an NVMe
 * namespace, reads the kernel log, and samples its own clock. Whenever the VMM asks for a check
 * on the guest-control port it prints one line on the console:
 *
 *   LUVMM-LINUX-CHECK {"checks":N,"uptime_s":X,"memory":"ok"|{...},"io":{...}|null,
 *                      "kernel_warnings":[...],"controller_resets":N,"clock":{...}}
 *
 * and once, after filling memory, a LUVMM-LINUX-READY line. Parameters come from the kernel
 * command line (luvmm.judge.mem_pct, luvmm.judge.nvme, luvmm.judge.io_mib, luvmm.judge.seed,
 * luvmm.judge.sample_ms, luvmm.judge.io_pause_ms).
 *
 * `judge --host-test ...` runs the same checks on the host so luvmm's tests can break each one:
 * I/O on a regular file, the kernel log from a file, one check per line of a requests file or
 * FIFO, the host's time from its own clock. Everything specific to it is in host_test_args().
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fs.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define BLOCK 4096u
#define CONTROL_PORT 0x600
#define HOST_TIME_LOW (CONTROL_PORT + 4)
#define HOST_TIME_HIGH (CONTROL_PORT + 8)
#define REQUEST_CHECK 1u
#define MAX_WARNINGS 20
#define WARNING_CHARS 200
/* "LUVMJDG1" read as a little-endian word. */
#define BLOCK_MAGIC 0x3147444a4d56554cull

struct config {
    int host_test;
    unsigned mem_pct;          /* share of MemAvailable to fill (guest) */
    uint64_t mem_bytes;        /* bytes to fill (host test) */
    char io_path[256];         /* "" = no I/O loop */
    int io_explicit;           /* the path was given, not found */
    uint64_t io_bytes;         /* region used on the device or file */
    char kmsg_path[256];
    char requests_path[256];
    int64_t host_offset_ns;    /* host test: the "host" clock runs this far ahead */
    uint64_t seed;
    unsigned sample_ms;        /* the clock sampler's period */
    unsigned io_pause_ms;      /* a pause after each block, to leave a slow host CPU time */
};

static struct config cfg = {
    .mem_pct = 50,
    .io_bytes = 16ull << 20,
    .kmsg_path = "/dev/kmsg",
    .sample_ms = 1,
};

/* Everything the threads report, under one lock. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static struct {
    uint64_t written, verified, errors, mismatches;
    int last_errno;
    int64_t first_mismatch_lba;
    const char *first_mismatch_why;
    uint64_t longest_stall_ns;
} io;

static struct {
    char lines[MAX_WARNINGS][WARNING_CHARS + 1];
    unsigned stored;
    uint64_t count;
    uint64_t controller_resets;
} klog;

static struct {
    int backwards;
    uint64_t longest_gap_ns;
    /* Over one sampling period: CLOCK_MONOTONIC's progress minus the TSC's, the largest. */
    int64_t tsc_lag_ns;
} clk;

/* TSC ticks per ns, measured at start. */
static double tsc_per_ns;
static uint64_t last_tsc;

static uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

static uint64_t now_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* One whole line per write, so lines of the judge never interleave with each other. */
static void emit(const char *fmt, ...)
{
    static char line[64 * 1024];
    static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;
    va_list ap;
    pthread_mutex_lock(&out);
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    const char *p = line;
    while (n > 0) {
        ssize_t w = write(STDOUT_FILENO, p, (size_t)n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        p += w;
        n -= (int)w;
    }
    pthread_mutex_unlock(&out);
}

static void die(const char *what)
{
    emit("LUVMM-LINUX-ERROR {\"what\":\"%s\",\"errno\":%d}", what, errno);
    exit(1);
}

/* splitmix64: a well-spread word from a counter, for page words and block payloads. */
static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

/* ---- parameters ---- */

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

static void copy_path(char *dst, const char *src)
{
    snprintf(dst, 256, "%s", src);
}

static void cmdline_args(void)
{
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        die("open /proc/cmdline");
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n < 0)
        die("read /proc/cmdline");
    buf[n] = 0;
    for (char *save = NULL, *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
        uint64_t v;
        if (!strncmp(w, "luvmm.judge.mem_pct=", 20) && !parse_u64(w + 20, &v) && v <= 90) {
            cfg.mem_pct = (unsigned)v;
        } else if (!strncmp(w, "luvmm.judge.nvme=", 17)) {
            copy_path(cfg.io_path, strcmp(w + 17, "none") ? w + 17 : "");
            cfg.io_explicit = 1;
        } else if (!strncmp(w, "luvmm.judge.io_mib=", 19) && !parse_u64(w + 19, &v) && v > 0) {
            cfg.io_bytes = v << 20;
        } else if (!strncmp(w, "luvmm.judge.seed=", 17) && !parse_u64(w + 17, &v)) {
            cfg.seed = v;
        } else if (!strncmp(w, "luvmm.judge.sample_ms=", 22) && !parse_u64(w + 22, &v) &&
                   v > 0 && v <= 1000) {
            cfg.sample_ms = (unsigned)v;
        } else if (!strncmp(w, "luvmm.judge.io_pause_ms=", 24) && !parse_u64(w + 24, &v) &&
                   v <= 1000) {
            cfg.io_pause_ms = (unsigned)v;
        }
    }
}

/* The host test's flags; nothing else in the judge knows it is not in a guest. */
static void host_test_args(int argc, char **argv)
{
    cfg.host_test = 1;
    cfg.mem_bytes = 4ull << 20;
    cfg.io_bytes = 256ull << 10;
    cfg.kmsg_path[0] = 0;
    for (int i = 2; i < argc; i++) {
        const char *flag = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        uint64_t v;
        if (!val)
            die("a flag without its value");
        i++;
        if (!strcmp(flag, "--file"))
            copy_path(cfg.io_path, val);
        else if (!strcmp(flag, "--kmsg"))
            copy_path(cfg.kmsg_path, val);
        else if (!strcmp(flag, "--requests"))
            copy_path(cfg.requests_path, val);
        else if (!strcmp(flag, "--mem-kib") && !parse_u64(val, &v) && v > 0)
            cfg.mem_bytes = v << 10;
        else if (!strcmp(flag, "--io-kib") && !parse_u64(val, &v) && v >= 4)
            cfg.io_bytes = v << 10;
        else if (!strcmp(flag, "--seed") && !parse_u64(val, &v))
            cfg.seed = v;
        else if (!strcmp(flag, "--host-offset-ms") && !parse_u64(val, &v))
            cfg.host_offset_ns = (int64_t)v * 1000000;
        else
            die("unknown or bad host-test flag");
    }
    if (!cfg.io_path[0] || !cfg.kmsg_path[0] || !cfg.requests_path[0])
        die("--host-test needs --file, --kmsg and --requests");
}

/* ---- memory ---- */

static uint64_t *mem;
static uint64_t mem_pages;

static uint64_t page_word(uint64_t page)
{
    return mix(cfg.seed ^ (page * 0x100000001b3ull));
}

static uint64_t mem_available(void)
{
    char line[256];
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        die("open /proc/meminfo");
    uint64_t kib = 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %" SCNu64 " kB", &kib) == 1)
            break;
    fclose(f);
    return kib << 10;
}

static int fill_memory(void)
{
    uint64_t bytes = cfg.host_test ? cfg.mem_bytes : mem_available() / 100 * cfg.mem_pct;
    mem_pages = bytes / PAGE;
    if (mem_pages == 0)
        mem_pages = 1;
    void *p = mmap(NULL, mem_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap the memory to fill");
    mem = p;
    int locked = mlock(p, mem_pages * PAGE) == 0;
    for (uint64_t i = 0; i < mem_pages; i++)
        mem[i * (PAGE / 8)] = page_word(i);
    return locked;
}

/* Writes the memory report (a JSON value) into out. */
static void check_memory(char *out, size_t len)
{
    uint64_t bad = 0, first = 0, expected = 0, found = 0;
    for (uint64_t i = 0; i < mem_pages; i++) {
        uint64_t want = page_word(i);
        uint64_t got = ((volatile uint64_t *)mem)[i * (PAGE / 8)];
        if (got != want) {
            if (!bad) {
                first = i;
                expected = want;
                found = got;
            }
            bad++;
        }
    }
    if (!bad)
        snprintf(out, len, "\"ok\"");
    else
        snprintf(out, len,
                 "{\"first_bad_page\":%" PRIu64 ",\"expected\":\"0x%016" PRIx64 "\",\"found\":\"0x%016" PRIx64
                 "\",\"bad_pages\":%" PRIu64 "}",
                 first, expected, found, bad);
}

/* ---- I/O ---- */

static int io_fd = -1;
static int io_direct;
static uint64_t io_blocks;

/* The block written at sequence number seq: header, payload, CRC32 over all with crc zero. */
static void make_block(uint8_t *b, uint64_t seq, uint64_t lba)
{
    uint64_t *w = (uint64_t *)b;
    w[0] = BLOCK_MAGIC;
    w[1] = seq;
    w[2] = lba;
    w[3] = 0; /* crc (low half), zero while it is computed */
    for (unsigned i = 4; i < BLOCK / 8; i++)
        w[i] = mix(cfg.seed ^ (seq << 9 ^ i));
    uint32_t crc = crc32_of(b, BLOCK);
    memcpy(b + 24, &crc, 4);
}

/* Why the block read back is not `want`, or NULL if it is. */
static const char *block_differs(uint8_t *got, const uint8_t *want)
{
    if (!memcmp(got, want, BLOCK))
        return NULL;
    uint32_t crc;
    memcpy(&crc, got + 24, 4);
    memset(got + 24, 0, 4);
    int crc_ok = crc32_of(got, BLOCK) == crc;
    if (!crc_ok)
        return "crc";
    return memcmp(got, want, 24) ? "stale" : "data";
}

static void io_error(int err)
{
    pthread_mutex_lock(&lock);
    io.errors++;
    io.last_errno = err;
    pthread_mutex_unlock(&lock);
    sleep_ms(10);
}

static void io_mismatch(uint64_t lba, const char *why)
{
    pthread_mutex_lock(&lock);
    if (!io.mismatches) {
        io.first_mismatch_lba = (int64_t)lba;
        io.first_mismatch_why = why;
    }
    io.mismatches++;
    pthread_mutex_unlock(&lock);
}

static uint64_t last_completion;

/*
 * Under the lock: the time since the last completion counts toward the longest stall, at a
 * completion (`completed`) and at each check, so an I/O that never completes shows too.
 */
static void io_stall(int completed)
{
    uint64_t now = now_ns(CLOCK_MONOTONIC);
    if (now < last_completion)
        clk.backwards = 1; /* read under the same lock after it: the clock went back */
    else if (now - last_completion > io.longest_stall_ns)
        io.longest_stall_ns = now - last_completion;
    if (completed)
        last_completion = now;
}

/* One I/O; its completion counts toward the longest stall. 0 on success, else errno. */
static int one_io(int write, uint8_t *buf, uint64_t lba)
{
    off_t off = (off_t)(lba * BLOCK);
    ssize_t n = write ? pwrite(io_fd, buf, BLOCK, off) : pread(io_fd, buf, BLOCK, off);
    int err = n < 0 ? errno : n != BLOCK ? EIO : 0;
    pthread_mutex_lock(&lock);
    io_stall(1);
    pthread_mutex_unlock(&lock);
    return err;
}

/*
 * Before each block is overwritten, the copy written one pass earlier is read and compared (data
 * at rest across whatever happened since); each new block is read back at once.
 */
static void *io_loop(void *arg)
{
    (void)arg;
    uint8_t *want, *got, *old;
    if (posix_memalign((void **)&want, BLOCK, BLOCK) || posix_memalign((void **)&got, BLOCK, BLOCK) ||
        posix_memalign((void **)&old, BLOCK, BLOCK))
        die("allocate I/O buffers");
    /* The sequence number each block last holds; UINT64_MAX when unknown. */
    uint64_t *held = malloc(io_blocks * sizeof(*held));
    if (!held)
        die("allocate the block map");
    for (uint64_t i = 0; i < io_blocks; i++)
        held[i] = UINT64_MAX;
    for (uint64_t seq = 0;; seq++) {
        uint64_t lba = seq % io_blocks;
        int err;
        if (held[lba] != UINT64_MAX) {
            make_block(old, held[lba], lba);
            if ((err = one_io(0, got, lba))) {
                io_error(err);
            } else {
                const char *why = block_differs(got, old);
                if (why)
                    io_mismatch(lba, why);
                pthread_mutex_lock(&lock);
                io.verified += !why;
                pthread_mutex_unlock(&lock);
            }
        }
        make_block(want, seq, lba);
        if ((err = one_io(1, want, lba))) {
            held[lba] = UINT64_MAX;
            io_error(err);
            continue;
        }
        held[lba] = seq;
        pthread_mutex_lock(&lock);
        io.written++;
        pthread_mutex_unlock(&lock);
        if ((err = one_io(0, got, lba))) {
            io_error(err);
            continue;
        }
        const char *why = block_differs(got, want);
        if (why)
            io_mismatch(lba, why);
        pthread_mutex_lock(&lock);
        io.verified += !why;
        pthread_mutex_unlock(&lock);
        if (cfg.io_pause_ms)
            sleep_ms(cfg.io_pause_ms);
    }
    return NULL;
}

/* Unless one was named: the first namespace of the first NVMe controller, if there is one. */
static void find_device(void)
{
    if (cfg.io_explicit || cfg.host_test)
        return;
    glob_t g;
    if (glob("/sys/class/nvme/nvme*", 0, NULL, &g) != 0)
        return;
    const char *ctrl = strrchr(g.gl_pathv[0], '/') + 1;
    snprintf(cfg.io_path, sizeof(cfg.io_path), "/dev/%sn1", ctrl);
    globfree(&g);
}

static void open_device(void)
{
    if (!cfg.io_path[0])
        return;
    int create = cfg.host_test ? O_CREAT : 0;
    /* The namespace appears when the driver's scan, asynchronous, gets to it. */
    for (int tries = 0; tries < 1000; tries++) {
        io_fd = open(cfg.io_path, O_RDWR | O_DIRECT | create, 0600);
        io_direct = io_fd >= 0;
        if (io_fd < 0 && errno == EINVAL)
            io_fd = open(cfg.io_path, O_RDWR | create, 0600);
        if (io_fd >= 0 || errno != ENOENT || cfg.host_test)
            break;
        sleep_ms(10);
    }
    if (io_fd < 0)
        die("open the I/O device");
    struct stat st;
    if (fstat(io_fd, &st) != 0)
        die("stat the I/O device");
    uint64_t size;
    /* A namespace smaller than the region asked for is used whole. */
    if (S_ISBLK(st.st_mode) && ioctl(io_fd, BLKGETSIZE64, &size) == 0 && size < cfg.io_bytes)
        cfg.io_bytes = size;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < cfg.io_bytes && ftruncate(io_fd, (off_t)cfg.io_bytes) != 0)
        die("size the I/O file");
    io_blocks = cfg.io_bytes / BLOCK;
    if (io_blocks == 0)
        die("the I/O device holds no whole block");
}

/* ---- kernel log ---- */

static int contains(const char *s, const char *what)
{
    return strstr(s, what) != NULL;
}

/*
 * The kernel's own reports start the message with Oops, BUG:, WARNING: or watchdog: (the lockup
 * detector's prefix); elsewhere in a line those words are boot notices (a mitigation's advice,
 * the NMI watchdog's state).
 */
static int starts(const char *s, const char *what)
{
    return strncmp(s, what, strlen(what)) == 0;
}

/* after_start: logged after the judge started (the boot's own clocksource switch is normal). */
static void judge_line(const char *msg, int after_start)
{
    /* The driver's own messages start with its name ("nvme nvme0: ..."); elsewhere the word
     * is a command line (nvme_core.io_timeout=) or a boot notice. */
    int reset = starts(msg, "nvme ") &&
                (contains(msg, "timeout") || contains(msg, "resetting controller") ||
                 contains(msg, "reset controller") || contains(msg, "controller is down") ||
                 contains(msg, "Abort status"));
    int warning = !reset &&
                  (starts(msg, "Oops") || starts(msg, "BUG:") || starts(msg, "WARNING:") ||
                   contains(msg, "soft lockup") || contains(msg, "hard LOCKUP") ||
                   contains(msg, "rcu: INFO:") || contains(msg, "self-detected stall") ||
                   contains(msg, "detected stalls on CPUs") || contains(msg, "blocked for more than") ||
                   starts(msg, "watchdog:") || contains(msg, "general protection fault") ||
                   contains(msg, "Kernel panic") ||
                   (contains(msg, "clocksource") && contains(msg, "unstable")) ||
                   (after_start && contains(msg, "Switched to clocksource")));
    if (!reset && !warning)
        return;
    pthread_mutex_lock(&lock);
    if (reset) {
        klog.controller_resets++;
    } else {
        if (klog.stored < MAX_WARNINGS) {
            size_t n = strnlen(msg, WARNING_CHARS);
            memcpy(klog.lines[klog.stored], msg, n);
            klog.lines[klog.stored++][n] = 0;
        }
        klog.count++;
    }
    pthread_mutex_unlock(&lock);
}

/* A /dev/kmsg record is "prio,seq,usec,flags;message"; a plain line is the message itself. */
static const char *message_of(const char *rec)
{
    const char *semi = strchr(rec, ';');
    if (!semi || !isdigit((unsigned char)rec[0]))
        return rec;
    for (const char *p = rec; p < semi; p++)
        if (!strchr("0123456789,-+c", *p))
            return rec;
    return semi + 1;
}

/* Splits what was read into lines; a partial last line waits for the rest. */
struct lines {
    char buf[16384];
    size_t len;
};

static void feed(struct lines *l, const char *data, size_t n, void (*each)(char *line, void *), void *arg)
{
    if (n > sizeof(l->buf) - 1 - l->len)
        n = sizeof(l->buf) - 1 - l->len;
    memcpy(l->buf + l->len, data, n);
    l->len += n;
    char *start = l->buf, *nl;
    while ((nl = memchr(start, '\n', l->len - (size_t)(start - l->buf)))) {
        *nl = 0;
        each(start, arg);
        start = nl + 1;
    }
    l->len -= (size_t)(start - l->buf);
    memmove(l->buf, start, l->len);
    if (l->len == sizeof(l->buf) - 1) /* a line longer than the buffer: take it as it is */
        l->len = 0;
}

static void kmsg_line(char *line, void *after_start)
{
    if (line[0] == ' ') /* a kmsg record's KEY=value continuation */
        return;
    judge_line(message_of(line), *(int *)after_start);
}

/*
 * What is in the log when the judge starts is read first, without waiting: a clocksource
 * switch in it belongs to the boot. Then it follows the log (a file is polled for growth).
 */
static int kmsg_fd = -1;
static int kmsg_is_device;
static int kmsg_caught_up;
static pthread_mutex_t caught_up_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t caught_up_cond = PTHREAD_COND_INITIALIZER;

static void *kmsg_loop(void *arg)
{
    (void)arg;
    static struct lines l;
    static char rec[8192];
    int after_start = 0;
    for (;;) {
        ssize_t n = read(kmsg_fd, rec, sizeof(rec) - 1);
        if (n > 0) {
            if (kmsg_is_device && rec[n - 1] != '\n')
                rec[n++] = '\n';
            feed(&l, rec, (size_t)n, kmsg_line, &after_start);
            continue;
        }
        if (n < 0 && errno == EPIPE) /* records overwritten before we read them */
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN)
            die("read the kernel log");
        if (!after_start) {
            after_start = 1;
            if (kmsg_is_device)
                fcntl(kmsg_fd, F_SETFL, fcntl(kmsg_fd, F_GETFL) & ~O_NONBLOCK);
            pthread_mutex_lock(&caught_up_lock);
            kmsg_caught_up = 1;
            pthread_cond_broadcast(&caught_up_cond);
            pthread_mutex_unlock(&caught_up_lock);
        }
        if (!kmsg_is_device)
            sleep_ms(20);
    }
    return NULL;
}

/* ---- clocks ---- */

static uint64_t last_sample;

/*
 * Under the lock: one sample of CLOCK_MONOTONIC, from the sampler or from a check, and of the
 * TSC: over a pause the two must move on together (a TSC left where it stopped lags by the
 * whole pause).
 */
static void clock_sample(void)
{
    uint64_t t = now_ns(CLOCK_MONOTONIC);
    uint64_t c = rdtsc();
    if (t < last_sample)
        clk.backwards = 1;
    else if (t - last_sample > clk.longest_gap_ns)
        clk.longest_gap_ns = t - last_sample;
    if (tsc_per_ns > 0) {
        int64_t tsc_ns = (int64_t)((double)(int64_t)(c - last_tsc) / tsc_per_ns);
        int64_t lag = (int64_t)(t - last_sample) - tsc_ns;
        if (llabs(lag) > llabs(clk.tsc_lag_ns))
            clk.tsc_lag_ns = lag;
    }
    last_sample = t;
    last_tsc = c;
}

/* The TSC's rate against CLOCK_MONOTONIC, over 200 ms. */
static void calibrate_tsc(void)
{
    uint64_t t0 = now_ns(CLOCK_MONOTONIC), c0 = rdtsc();
    sleep_ms(200);
    uint64_t t1 = now_ns(CLOCK_MONOTONIC), c1 = rdtsc();
    tsc_per_ns = (double)(c1 - c0) / (double)(t1 - t0);
}

/*
 * On an SMP guest the sampler moves to the next CPU before each sample, so that
 * CLOCK_MONOTONIC and the TSC are compared across vCPUs too: a vCPU whose clock or TSC came
 * back behind another's reads as going backwards or as a TSC lag.
 */
static void *clock_loop(void *arg)
{
    (void)arg;
    long cpus = cfg.host_test ? 1 : sysconf(_SC_NPROCESSORS_ONLN);
    for (unsigned long n = 0;; n++) {
        sleep_ms(cfg.sample_ms);
        if (cpus > 1) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET((int)(n % (unsigned long)cpus), &set);
            sched_setaffinity(0, sizeof(set), &set);
        }
        pthread_mutex_lock(&lock);
        clock_sample();
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

/* The host's CLOCK_REALTIME, latched by the VMM at the low read. */
static uint64_t host_realtime(void)
{
    if (cfg.host_test)
        return now_ns(CLOCK_REALTIME) + (uint64_t)cfg.host_offset_ns;
    uint64_t low = inl(HOST_TIME_LOW);
    uint64_t high = inl(HOST_TIME_HIGH);
    return high << 32 | low;
}

/* Guest realtime minus host realtime, in ms, from guest reads bracketing the host's latch. */
static double realtime_offset_ms(void)
{
    uint64_t before = now_ns(CLOCK_REALTIME);
    uint64_t host = host_realtime();
    uint64_t after = now_ns(CLOCK_REALTIME);
    int64_t guest_mid = (int64_t)(before + (after - before) / 2);
    return (double)(guest_mid - (int64_t)host) / 1e6;
}

/* ---- checks ---- */

static void json_string(char *out, size_t len, const char *s)
{
    size_t o = 0;
    if (len < 3)
        return;
    out[o++] = '"';
    for (; *s && o + 8 < len; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, len - o, "\\u%04x", c);
        } else {
            out[o++] = c < 0x80 ? (char)c : '?';
        }
    }
    out[o++] = '"';
    out[o] = 0;
}

static uint64_t checks;

static void check(void)
{
    static char memory[256], io_json[512], warnings[MAX_WARNINGS * (WARNING_CHARS * 6 + 4) + 4];
    checks++;
    double offset_ms = realtime_offset_ms();
    check_memory(memory, sizeof(memory));
    pthread_mutex_lock(&lock);
    clock_sample();
    if (io_fd >= 0)
        io_stall(0);
    if (io_fd < 0) {
        snprintf(io_json, sizeof(io_json), "null");
    } else {
        char first[96] = "";
        if (io.mismatches)
            snprintf(first, sizeof(first), ",\"first_mismatch\":{\"lba\":%" PRId64 ",\"why\":\"%s\"}",
                     io.first_mismatch_lba, io.first_mismatch_why);
        snprintf(io_json, sizeof(io_json),
                 "{\"written\":%" PRIu64 ",\"verified\":%" PRIu64 ",\"errors\":%" PRIu64
                 ",\"mismatches\":%" PRIu64 ",\"longest_stall_ms\":%.3f,\"last_errno\":%d%s}",
                 io.written, io.verified, io.errors, io.mismatches, (double)io.longest_stall_ns / 1e6,
                 io.last_errno, first);
    }
    size_t w = 0;
    warnings[w++] = '[';
    for (unsigned i = 0; i < klog.stored; i++) {
        if (i)
            warnings[w++] = ',';
        json_string(warnings + w, sizeof(warnings) - w - 2, klog.lines[i]);
        w += strlen(warnings + w);
    }
    warnings[w++] = ']';
    warnings[w] = 0;
    uint64_t warning_count = klog.count, resets = klog.controller_resets;
    int backwards = clk.backwards;
    double gap_ms = (double)clk.longest_gap_ns / 1e6;
    double tsc_lag_ms = (double)clk.tsc_lag_ns / 1e6;
    /*
     * The longest stall and gap are per check: each says what the span since the last saw. A
     * stall still going on at a check counts here and again, whole, in the span it ends in.
     */
    io.longest_stall_ns = 0;
    clk.longest_gap_ns = 0;
    clk.tsc_lag_ns = 0;
    pthread_mutex_unlock(&lock);
    emit("LUVMM-LINUX-CHECK {\"checks\":%" PRIu64 ",\"uptime_s\":%.3f,\"memory\":%s,\"io\":%s,"
         "\"kernel_warnings\":%s,\"kernel_warning_count\":%" PRIu64 ",\"controller_resets\":%" PRIu64
         ",\"clock\":{\"realtime_offset_ms\":%.3f,\"monotonic_backwards\":%s,\"longest_gap_ms\":%.3f,"
         "\"tsc_lag_ms\":%.3f}}",
         checks, (double)now_ns(CLOCK_BOOTTIME) / 1e9, memory, io_json, warnings, warning_count, resets,
         offset_ms, backwards ? "true" : "false", gap_ms, tsc_lag_ms);
}

static void requests_line(char *line, void *arg)
{
    (void)line;
    (void)arg;
    check();
}

/* Guest: the VMM's requests on the port, polled every 20 ms. */
static void serve_port(void)
{
    for (;;) {
        uint32_t pending = inl(CONTROL_PORT);
        if (pending & REQUEST_CHECK)
            check();
        if (pending & ~REQUEST_CHECK)
            emit("LUVMM-LINUX-IGNORED {\"requests\":%u}", pending & ~REQUEST_CHECK);
        sleep_ms(20);
    }
}

/* Host test: one check per line of the requests file or FIFO. */
static void serve_file(void)
{
    static struct lines l;
    char buf[512];
    int fd = open(cfg.requests_path, O_RDONLY);
    if (fd < 0)
        die("open the requests file");
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n > 0)
            feed(&l, buf, (size_t)n, requests_line, NULL);
        else if (n < 0 && errno != EINTR)
            die("read the requests file");
        else
            sleep_ms(20);
    }
}

static void start(void *(*fn)(void *))
{
    pthread_t t;
    if (pthread_create(&t, NULL, fn, NULL) != 0)
        die("start a thread");
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--host-test"))
        host_test_args(argc, argv);
    else if (argc > 1)
        die("usage: judge [--host-test --file PATH --kmsg PATH --requests PATH [--mem-kib N] "
            "[--io-kib N] [--seed N] [--host-offset-ms N]]");
    else
        cmdline_args();
    if (!cfg.host_test && ioperm(CONTROL_PORT, 16, 1) != 0)
        die("ioperm the guest-control port");
    /*
     * Like a guest's time agent at boot (chrony with ptp_kvm), take the host's wall clock
     * once: the guest's own reading at boot can be seconds off (in the nested bed its
     * timekeeping loses time before kvm-clock takes over), and what the checks judge is
     * whether a pause, a handover or an update moves the clock, not how it was first set.
     */
    if (!cfg.host_test) {
        uint64_t host = host_realtime();
        struct timespec ts = { .tv_sec = (time_t)(host / 1000000000u),
                               .tv_nsec = (long)(host % 1000000000u) };
        if (clock_settime(CLOCK_REALTIME, &ts) != 0)
            die("set the clock from the host's");
    }
    if (!cfg.seed)
        cfg.seed = mix(now_ns(CLOCK_REALTIME) ^ (uint64_t)getpid());
    crc_init();

    kmsg_fd = open(cfg.kmsg_path, O_RDONLY);
    struct stat kst;
    if (kmsg_fd < 0 || fstat(kmsg_fd, &kst) != 0)
        die("open the kernel log");
    /* /dev/kmsg gives one record per read and blocks at the end; a file is polled. */
    kmsg_is_device = S_ISCHR(kst.st_mode);
    if (kmsg_is_device && fcntl(kmsg_fd, F_SETFL, O_NONBLOCK) != 0)
        die("make the kernel log non-blocking");
    start(kmsg_loop);
    calibrate_tsc();
    last_sample = now_ns(CLOCK_MONOTONIC);
    last_tsc = rdtsc();
    start(clock_loop);
    pthread_mutex_lock(&caught_up_lock);
    while (!kmsg_caught_up)
        pthread_cond_wait(&caught_up_cond, &caught_up_lock);
    pthread_mutex_unlock(&caught_up_lock);

    int locked = fill_memory();
    find_device();
    open_device();
    char device[300];
    if (io_fd >= 0)
        json_string(device, sizeof(device), cfg.io_path);
    else
        snprintf(device, sizeof(device), "null");
    emit("LUVMM-LINUX-READY {\"pages\":%" PRIu64 ",\"mlocked\":%s,\"mem_base\":\"0x%" PRIxPTR
         "\",\"seed\":\"0x%016" PRIx64 "\",\"device\":%s,\"direct\":%s,\"io_blocks\":%" PRIu64 "}",
         mem_pages, locked ? "true" : "false", (uintptr_t)mem, cfg.seed, device,
         io_direct ? "true" : "false", io_fd >= 0 ? io_blocks : 0);
    if (io_fd >= 0) {
        last_completion = now_ns(CLOCK_MONOTONIC);
        start(io_loop);
    }
    if (cfg.host_test)
        serve_file();
    else
        serve_port();
    return 0;
}
