# README: an unchanged program where C keeps a pointer and uses it later.
python -m ptrbridge run -- python src/ptrbridge/demo_programs/stdio_buffer.py
