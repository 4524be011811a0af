/* File operations Python's os module lacks. */
#ifndef RF_FILEIO_H
#define RF_FILEIO_H
int rf_punch_hole(int fd, long long offset, long long length);
#endif
