import sys

try:
    from qlocal.cli import main
except KeyboardInterrupt:  # Ctrl-C (or the studio's Stop) while Python is still importing qlocal
    sys.stderr.write("interrupted\n")
    sys.exit(130)

if __name__ == "__main__":
    main()
