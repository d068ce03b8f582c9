/* rankfold test driver: reads N int8 input samples from a file, runs the model on each, writes the
 * int8 outputs to another file. Usage: model_test INPUTS.bin OUTPUTS.bin */
#include <stdio.h>

#include "model.h"

static uint8_t arena[MODEL_ARENA_SIZE + 4];
static int8_t input[MODEL_INPUT_SIZE];
static int8_t output[MODEL_OUTPUT_SIZE];

int main(int argc, char **argv)
{
    FILE *in_file, *out_file;
    long count = 0;
    if (argc < 3) {
        fprintf(stderr, "usage: %s INPUTS.bin OUTPUTS.bin\n", argv[0]);
        return 2;
    }
    in_file = fopen(argv[1], "rb");
    out_file = fopen(argv[2], "wb");
    if (in_file == NULL || out_file == NULL) {
        fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    while (fread(input, 1, MODEL_INPUT_SIZE, in_file) == MODEL_INPUT_SIZE) {
        model_run(input, output, arena);
        if (fwrite(output, 1, MODEL_OUTPUT_SIZE, out_file) != MODEL_OUTPUT_SIZE) {
            fprintf(stderr, "write failed\n");
            return 1;
        }
        ++count;
    }
    fclose(in_file);
    fclose(out_file);
    printf("%ld samples\n", count);
    return 0;
}
