/* Reads and writes on a plain file descriptor with hvkit's raw-file
 * semantics (hvkit/storage/raw.py): reads past the end give zeros, O_DIRECT
 * I/O that is not aligned goes through an aligned bounce buffer (cutting
 * the file back where a whole block would grow it), write-zeroes and
 * discard through fallocate where the file system has it. Shared by the
 * native engines.
 */
#ifndef HVKIT_FILEIO_H
#define HVKIT_FILEIO_H

#include <stdint.h>

/* the bounce buffer: HV_BOUNCE_CHUNK + the largest alignment (4096) bytes,
 * aligned; the zeros buffer: HV_BOUNCE_CHUNK read-only zero bytes */
#define HV_BOUNCE_CHUNK (1u << 20)

/* fallocate modes (linux/falloc.h), for C libraries that lack them */
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif

struct hv_file {
    int fd;
    uint64_t size;         /* bytes */
    int read_only;
    uint32_t align;        /* O_DIRECT alignment, 1 if buffered */
};

int hv_pread_full(int fd, uint8_t *buf, uint64_t len, uint64_t off);
int hv_pwrite_full(int fd, const uint8_t *buf, uint64_t len, uint64_t off);
/* [off, off+len) of the file to/from buf; -EINVAL outside the file, else
 * 0 or -errno */
int hv_file_io(const struct hv_file *f, uint8_t *bounce, uint64_t off, uint8_t *buf,
               uint64_t len, int write);
/* can [buf, buf+len) at off go straight to the fd (no bounce)? */
int hv_file_direct_ok(const struct hv_file *f, uint64_t off, const void *buf, uint64_t len);
int hv_file_flush(const struct hv_file *f);
/* 1 done, 0 not supported here, -errno failure */
int hv_fallocate(const struct hv_file *f, int mode, uint64_t off, uint64_t len);
int hv_write_zeroes(const struct hv_file *f, uint8_t *bounce, const uint8_t *zeros,
                    uint64_t off, uint64_t len);
/* deallocate where the file system can; 0 or -errno */
int hv_discard(const struct hv_file *f, uint64_t off, uint64_t len);
/* allocate the bounce and zeros buffers (0 or -ENOMEM) and free them */
int hv_io_buffers(uint8_t **bounce, uint8_t **zeros);
void hv_io_buffers_free(uint8_t *bounce, uint8_t *zeros);

#endif
